/* Mechanism only: map a ring, copy SQEs staged by Python into it, publish,
 * enter, reap in batches, register resources.  Every policy decision is made in Python. */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "_shim.h"

/* The io_uring syscall numbers are the same on every architecture. */
#define TU_NR_SETUP 425
#define TU_NR_ENTER 426
#define TU_NR_REGISTER 427

/* mmap offsets and the one feature bit the mapping depends on. */
#define TU_OFF_SQ_RING 0ULL
#define TU_OFF_CQ_RING 0x8000000ULL
#define TU_OFF_SQES 0x10000000ULL
#define TU_FEAT_SINGLE_MMAP (1U << 0)

int tu_fault_setup_errno = 0;

#define LOAD_ACQUIRE(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE_RELEASE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

_Static_assert(sizeof(struct io_uring_sqe) == 64, "sqe layout");
_Static_assert(offsetof(struct io_uring_sqe, user_data) == 32, "sqe layout");
_Static_assert(offsetof(struct io_uring_sqe, buf_index) == 40, "sqe layout");
_Static_assert(sizeof(struct io_uring_cqe) == 16, "cqe layout");
_Static_assert(sizeof(struct io_uring_buf) == 16, "buf layout");
_Static_assert(sizeof(struct io_uring_params) == 120, "params layout");
_Static_assert(sizeof(struct io_uring_buf_reg) == 40, "buf_reg layout");

static int sys_ret(long ret)
{
    return ret < 0 ? -errno : (int)ret;
}

int tu_setup(struct tu_ring *r, uint32_t entries, uint32_t cq_entries, uint32_t flags,
             uint32_t sq_thread_idle)
{
    struct io_uring_params p;
    memset(r, 0, sizeof(*r));
    r->fd = -1;
    if (tu_fault_setup_errno)
        return -tu_fault_setup_errno;
    memset(&p, 0, sizeof(p));
    p.flags = flags;
    p.cq_entries = cq_entries;
    p.sq_thread_idle = sq_thread_idle;
    int fd = sys_ret(syscall(TU_NR_SETUP, entries, &p));
    if (fd < 0)
        return fd;

    size_t sq_size = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
    size_t cq_size = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & TU_FEAT_SINGLE_MMAP) {
        if (cq_size > sq_size)
            sq_size = cq_size;
        cq_size = sq_size;
    }
    void *sq = mmap(NULL, sq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                    fd, TU_OFF_SQ_RING);
    if (sq == MAP_FAILED)
        goto fail_fd;
    void *cq = sq;
    if (!(p.features & TU_FEAT_SINGLE_MMAP)) {
        cq = mmap(NULL, cq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                  fd, TU_OFF_CQ_RING);
        if (cq == MAP_FAILED)
            goto fail_sq;
    }
    size_t sqes_size = p.sq_entries * sizeof(struct io_uring_sqe);
    void *sqes = mmap(NULL, sqes_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                      fd, TU_OFF_SQES);
    if (sqes == MAP_FAILED)
        goto fail_cq;

    char *s = sq, *c = cq;
    r->fd = fd;
    r->features = p.features;
    r->sq_entries = p.sq_entries;
    r->cq_entries = p.cq_entries;
    r->sq_head = (uint32_t *)(s + p.sq_off.head);
    r->sq_tail = (uint32_t *)(s + p.sq_off.tail);
    r->sq_flags = (uint32_t *)(s + p.sq_off.flags);
    r->sq_mask = *(uint32_t *)(s + p.sq_off.ring_mask);
    r->sqe_tail = *r->sq_tail;
    r->sqes = sqes;
    r->cq_head = (uint32_t *)(c + p.cq_off.head);
    r->cq_tail = (uint32_t *)(c + p.cq_off.tail);
    r->cq_mask = *(uint32_t *)(c + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(c + p.cq_off.cqes);
    r->sq_map = sq;
    r->sq_map_size = sq_size;
    r->cq_map = cq;
    r->cq_map_size = cq_size;
    r->sqes_map_size = sqes_size;
    /* The SQ index array is the identity: SQE i sits in slot i. */
    uint32_t *array = (uint32_t *)(s + p.sq_off.array);
    for (uint32_t i = 0; i < p.sq_entries; i++)
        array[i] = i;
    return 0;

fail_cq:
    if (cq != sq)
        munmap(cq, cq_size);
fail_sq:
    munmap(sq, sq_size);
fail_fd:;
    int err = errno;
    close(fd);
    return -err;
}

void tu_close(struct tu_ring *r)
{
    if (r->fd < 0)
        return;
    munmap(r->sqes, r->sqes_map_size);
    if (r->cq_map != r->sq_map)
        munmap(r->cq_map, r->cq_map_size);
    munmap(r->sq_map, r->sq_map_size);
    close(r->fd);
    r->fd = -1;
}

uint32_t tu_sq_pending(struct tu_ring *r)
{
    return r->sqe_tail - LOAD_ACQUIRE(r->sq_head);
}

static uint32_t sq_space(struct tu_ring *r)
{
    return r->sq_entries - (r->sqe_tail - LOAD_ACQUIRE(r->sq_head));
}

int tu_enter(struct tu_ring *r, uint32_t to_submit, uint32_t min_complete, uint32_t flags)
{
    r->enter_calls++;
    return sys_ret(syscall(TU_NR_ENTER, r->fd, to_submit, min_complete, flags, NULL, 0));
}

/* Copy staged SQE images, in order, into the SQ: as many of the first
 * `count` as it has room for.  Returns how many; they are the kernel's only
 * once published (tu_publish_sq, or the submit of tu_submit_staged). */
uint32_t tu_copy_staged(struct tu_ring *r, const struct io_uring_sqe *staged, uint32_t count)
{
    uint32_t n = sq_space(r);
    if (n > count)
        n = count;
    uint32_t slot = r->sqe_tail & r->sq_mask;
    uint32_t before_wrap = r->sq_entries - slot;
    if (before_wrap > n)
        before_wrap = n;
    memcpy(&r->sqes[slot], staged, before_wrap * sizeof(*staged));
    memcpy(r->sqes, staged + before_wrap, (n - before_wrap) * sizeof(*staged));
    r->sqe_tail += n;
    return n;
}

/* Make every SQE in the SQ visible to the kernel without entering it (an
 * SQPOLL thread picks them up). */
void tu_publish_sq(struct tu_ring *r)
{
    STORE_RELEASE(r->sq_tail, r->sqe_tail);
}

static int submit_sq(struct tu_ring *r, uint32_t enter_flags)
{
    /* Everything the kernel has not consumed yet, including SQEs a previous
     * short submit left behind. */
    tu_publish_sq(r);
    uint32_t to_submit = r->sqe_tail - LOAD_ACQUIRE(r->sq_head);
    if (!to_submit && !enter_flags)
        return 0;
    return tu_enter(r, to_submit, 0, enter_flags);
}

uint32_t tu_reap(struct tu_ring *r, uint64_t *user_data, int32_t *res, uint32_t *flags, uint32_t max)
{
    uint32_t head = *r->cq_head;
    uint32_t tail = LOAD_ACQUIRE(r->cq_tail);
    uint32_t n = 0;
    while (head != tail && n < max) {
        struct io_uring_cqe *cqe = &r->cqes[head & r->cq_mask];
        user_data[n] = cqe->user_data;
        res[n] = cqe->res;
        flags[n] = cqe->flags;
        head++;
        n++;
    }
    STORE_RELEASE(r->cq_head, head);
    return n;
}

/* A flush in one call: copy the first `count` staged SQE images into the
 * SQ, enter the kernel once for everything the SQ holds, then reap up to
 * `max` CQEs (often the requests just submitted, completed inline).  A
 * batch larger than the free SQ is submitted in parts: when the SQ is full,
 * what it holds is submitted and the copy goes on.  Copying stops early when
 * an enter fails or the kernel took nothing (it refuses new work until its
 * overflow list drains).  out[0] is the number of images copied into the SQ
 * (the caller keeps the rest staged); out[1] the SQ flags, which tell
 * whether the kernel holds more completions (overflow, pending task work).
 * Returns the number reaped, or -errno from io_uring_enter with nothing
 * reaped. */
int tu_submit_staged(struct tu_ring *r, const struct io_uring_sqe *staged, uint32_t count,
                     uint32_t enter_flags, uint64_t *user_data, int32_t *res, uint32_t *flags,
                     uint32_t max, uint32_t *out)
{
    uint32_t copied = 0;
    int rc;
    for (;;) {
        copied += tu_copy_staged(r, staged + copied, count - copied);
        rc = submit_sq(r, enter_flags);
        if (rc < 0 || copied == count || !sq_space(r))
            break;
    }
    out[0] = copied;
    if (rc < 0)
        return rc;
    out[1] = LOAD_ACQUIRE(r->sq_flags);
    return (int)tu_reap(r, user_data, res, flags, max);
}

uint32_t tu_cq_ready(struct tu_ring *r)
{
    return LOAD_ACQUIRE(r->cq_tail) - *r->cq_head;
}

uint32_t tu_sq_flags(struct tu_ring *r)
{
    return LOAD_ACQUIRE(r->sq_flags);
}

int tu_register(int fd, uint32_t opcode, void *arg, uint32_t nr_args)
{
    return sys_ret(syscall(TU_NR_REGISTER, fd, opcode, arg, nr_args));
}

void tu_buf_ring_put(struct io_uring_buf *entries, uint32_t mask, uint32_t index,
                     uint64_t addr, uint32_t len, uint16_t bid)
{
    struct io_uring_buf *buf = &entries[index & mask];
    buf->addr = addr;
    buf->len = len;
    buf->bid = bid;
}

/* The ring tail overlays resv of entry 0 (struct io_uring_buf_ring). */
void tu_buf_ring_publish(struct io_uring_buf *entries, uint16_t tail)
{
    STORE_RELEASE(&entries[0].resv, tail);
}

uint16_t tu_buf_ring_tail(struct io_uring_buf *entries)
{
    return LOAD_ACQUIRE(&entries[0].resv);
}
