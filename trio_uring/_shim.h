/* UAPI structures of io_uring, declared here so that the build never depends
 * on the build machine's kernel headers.  This file is also the cffi cdef, so
 * it holds declarations only: no preprocessor directives, no attributes.
 * Opcodes and flag values live in _abi.py; the shim takes them as arguments. */

struct io_sqring_offsets {
    uint32_t head, tail, ring_mask, ring_entries, flags, dropped, array, resv1;
    uint64_t user_addr;
};

struct io_cqring_offsets {
    uint32_t head, tail, ring_mask, ring_entries, overflow, cqes, flags, resv1;
    uint64_t user_addr;
};

struct io_uring_params {
    uint32_t sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle;
    uint32_t features, wq_fd, resv[3];
    struct io_sqring_offsets sq_off;
    struct io_cqring_offsets cq_off;
};

/* struct io_uring_sqe with its unions collapsed to the member each slot
 * carries for the operations this project uses. */
struct io_uring_sqe {
    uint8_t opcode;
    uint8_t flags;
    uint16_t ioprio;
    int32_t fd;
    uint64_t off;
    uint64_t addr;
    uint32_t len;
    uint32_t op_flags;
    uint64_t user_data;
    uint16_t buf_index;
    uint16_t personality;
    int32_t file_index;
    uint64_t addr3;
    uint64_t pad2;
};

struct io_uring_cqe {
    uint64_t user_data;
    int32_t res;
    uint32_t flags;
};

struct io_uring_buf {
    uint64_t addr;
    uint32_t len;
    uint16_t bid;
    uint16_t resv;
};

struct io_uring_buf_reg {
    uint64_t ring_addr;
    uint32_t ring_entries;
    uint16_t bgid;
    uint16_t flags;
    uint64_t resv[3];
};

struct io_uring_probe_op {
    uint8_t op;
    uint8_t resv;
    uint16_t flags;
    uint32_t resv2;
};

struct io_uring_probe {
    uint8_t last_op;
    uint8_t ops_len;
    uint16_t resv;
    uint32_t resv2[3];
    struct io_uring_probe_op ops[256];
};

struct tu_iovec {
    void *iov_base;
    size_t iov_len;
};

struct tu_msghdr {
    void *msg_name;
    uint32_t msg_namelen;
    struct tu_iovec *msg_iov;
    size_t msg_iovlen;
    void *msg_control;
    size_t msg_controllen;
    int msg_flags;
};

/* One mapped ring.  The pointers point into the kernel-shared mappings. */
struct tu_ring {
    int fd;
    uint32_t features;
    uint32_t sq_entries;
    uint32_t cq_entries;
    uint32_t *sq_head;
    uint32_t *sq_tail;
    uint32_t *sq_flags;
    uint32_t sq_mask;
    uint32_t sqe_tail;      /* local tail: copied into the SQ, not yet published */
    struct io_uring_sqe *sqes;
    uint32_t *cq_head;
    uint32_t *cq_tail;
    uint32_t cq_mask;
    struct io_uring_cqe *cqes;
    void *sq_map;
    size_t sq_map_size;
    void *cq_map;
    size_t cq_map_size;
    size_t sqes_map_size;
    uint64_t enter_calls;   /* io_uring_enter syscalls made, for benchmarks */
};

/* Fault injection for tests: when non-zero, tu_setup fails with -errno. */
extern int tu_fault_setup_errno;

int tu_setup(struct tu_ring *r, uint32_t entries, uint32_t cq_entries, uint32_t flags,
             uint32_t sq_thread_idle);
void tu_close(struct tu_ring *r);

uint32_t tu_sq_pending(struct tu_ring *r);

int tu_enter(struct tu_ring *r, uint32_t to_submit, uint32_t min_complete, uint32_t flags);
uint32_t tu_copy_staged(struct tu_ring *r, const struct io_uring_sqe *staged, uint32_t count);
void tu_publish_sq(struct tu_ring *r);

uint32_t tu_reap(struct tu_ring *r, uint64_t *user_data, int32_t *res, uint32_t *flags, uint32_t max);
int tu_submit_staged(struct tu_ring *r, const struct io_uring_sqe *staged, uint32_t count,
                     uint32_t enter_flags, uint64_t *user_data, int32_t *res, uint32_t *flags,
                     uint32_t max, uint32_t *out);
uint32_t tu_cq_ready(struct tu_ring *r);
uint32_t tu_sq_flags(struct tu_ring *r);

int tu_register(int fd, uint32_t opcode, void *arg, uint32_t nr_args);

void tu_buf_ring_put(struct io_uring_buf *entries, uint32_t mask, uint32_t index,
                     uint64_t addr, uint32_t len, uint16_t bid);
void tu_buf_ring_publish(struct io_uring_buf *entries, uint16_t tail);
uint16_t tu_buf_ring_tail(struct io_uring_buf *entries);
