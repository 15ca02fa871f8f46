/* Reference sender for `python -m trio_uring.bench`: the machine's limit.
 *
 *   csender send HOST PORT SIZE SECONDS       plain blocking send() loop
 *   csender zc   HOST PORT SIZE SECONDS       io_uring SENDMSG_ZC from a registered buffer
 *
 * Each "message" is one full send of SIZE bytes (send() is repeated on short
 * writes, as a send_all does).  After SECONDS it shuts down the write side and
 * reads the sink's 8-byte little-endian count of bytes received, so the
 * elapsed time covers delivery, not only queueing.  Prints one JSON object.
 *
 * The io_uring structures and syscalls are written out here (no liburing,
 * no dependence on the build machine's <linux/io_uring.h>), with the layouts
 * of trio_uring/_shim.h.  The zc mode keeps one send in flight, as
 * ZeroCopyStream.send_all does, and reaps notifications as they come; the
 * payload never changes, so reusing the buffer before its notification
 * cannot corrupt what the sink counts. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define NR_SETUP 425
#define NR_ENTER 426
#define NR_REGISTER 427
#define OFF_SQ_RING 0ULL
#define OFF_CQ_RING 0x8000000ULL
#define OFF_SQES 0x10000000ULL
#define FEAT_SINGLE_MMAP (1U << 0)
#define ENTER_GETEVENTS (1U << 0)
#define OP_SENDMSG_ZC 48
#define REGISTER_BUFFERS 0
#define RECVSEND_FIXED_BUF (1U << 2)
#define SEND_ZC_REPORT_USAGE (1U << 3)
#define CQE_F_MORE (1U << 1)
#define CQE_F_NOTIF (1U << 3)
#define NOTIF_USAGE_ZC_COPIED (1U << 31)

struct sq_off { uint32_t head, tail, ring_mask, ring_entries, flags, dropped, array, resv1;
                uint64_t user_addr; };
struct cq_off { uint32_t head, tail, ring_mask, ring_entries, overflow, cqes, flags, resv1;
                uint64_t user_addr; };
struct params { uint32_t sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle;
                uint32_t features, wq_fd, resv[3]; struct sq_off sq; struct cq_off cq; };
struct sqe { uint8_t opcode, flags; uint16_t ioprio; int32_t fd; uint64_t off, addr;
             uint32_t len, op_flags; uint64_t user_data; uint16_t buf_index, personality;
             int32_t file_index; uint64_t addr3, pad2; };
struct cqe { uint64_t user_data; int32_t res; uint32_t flags; };

_Static_assert(sizeof(struct sqe) == 64, "sqe layout");
_Static_assert(sizeof(struct params) == 120, "params layout");

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec
           + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6;
}

static void die(const char *what, int err)
{
    fprintf(stderr, "csender: %s: %s\n", what, strerror(err));
    exit(1);
}

static int connect_to(const char *host, const char *port)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc) {
        fprintf(stderr, "csender: %s:%s: %s\n", host, port, gai_strerror(rc));
        exit(1);
    }
    int fd = socket(res->ai_family, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, res->ai_addr, res->ai_addrlen) < 0)
        die("connect", errno);
    freeaddrinfo(res);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;
}

/* Half-close and wait for the sink's count of bytes it received. */
static uint64_t finish(int fd)
{
    unsigned char ack[8];
    size_t got = 0;
    shutdown(fd, SHUT_WR);
    while (got < sizeof(ack)) {
        ssize_t n = recv(fd, ack + got, sizeof(ack) - got, 0);
        if (n <= 0)
            die("reading the sink's count", n < 0 ? errno : EPIPE);
        got += (size_t)n;
    }
    uint64_t count = 0;
    for (int i = 7; i >= 0; i--)
        count = (count << 8) | ack[i];
    return count;
}

static uint64_t send_loop(int fd, const char *buf, size_t size, double deadline)
{
    uint64_t messages = 0;
    do {
        size_t off = 0;
        while (off < size) {
            ssize_t n = send(fd, buf + off, size - off, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                die("send", errno);
            }
            off += (size_t)n;
        }
        messages++;
    } while (now() < deadline);
    return messages;
}

struct ring {
    int fd;
    uint32_t *sq_head, *sq_tail, sq_mask, *cq_head, *cq_tail, cq_mask;
    struct sqe *sqes;
    struct cqe *cqes;
    uint32_t tail;
    uint64_t enters, notifications, copied;
};

static void ring_setup(struct ring *r, unsigned entries)
{
    struct params p;
    memset(&p, 0, sizeof(p));
    memset(r, 0, sizeof(*r));
    r->fd = (int)syscall(NR_SETUP, entries, &p);
    if (r->fd < 0)
        die("io_uring_setup", errno);
    size_t sq_size = p.sq.array + p.sq_entries * sizeof(uint32_t);
    size_t cq_size = p.cq.cqes + p.cq_entries * sizeof(struct cqe);
    if (p.features & FEAT_SINGLE_MMAP)
        sq_size = cq_size = sq_size > cq_size ? sq_size : cq_size;
    char *sq = mmap(NULL, sq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                    OFF_SQ_RING);
    if (sq == MAP_FAILED)
        die("mmap sq", errno);
    char *cq = sq;
    if (!(p.features & FEAT_SINGLE_MMAP)) {
        cq = mmap(NULL, cq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                  OFF_CQ_RING);
        if (cq == MAP_FAILED)
            die("mmap cq", errno);
    }
    r->sqes = mmap(NULL, p.sq_entries * sizeof(struct sqe), PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_POPULATE, r->fd, OFF_SQES);
    if (r->sqes == MAP_FAILED)
        die("mmap sqes", errno);
    r->sq_head = (uint32_t *)(sq + p.sq.head);
    r->sq_tail = (uint32_t *)(sq + p.sq.tail);
    r->sq_mask = *(uint32_t *)(sq + p.sq.ring_mask);
    uint32_t *array = (uint32_t *)(sq + p.sq.array);
    for (uint32_t i = 0; i < p.sq_entries; i++)
        array[i] = i;
    r->cq_head = (uint32_t *)(cq + p.cq.head);
    r->cq_tail = (uint32_t *)(cq + p.cq.tail);
    r->cq_mask = *(uint32_t *)(cq + p.cq.ring_mask);
    r->cqes = (struct cqe *)(cq + p.cq.cqes);
    r->tail = *r->sq_tail;
}

static int ring_enter(struct ring *r, unsigned submit, unsigned wait)
{
    r->enters++;
    return (int)syscall(NR_ENTER, r->fd, submit, wait, wait ? ENTER_GETEVENTS : 0, NULL, 0);
}

/* Reap every CQE; return the send result if one arrived, else INT32_MIN. */
static int32_t ring_reap(struct ring *r, int *in_flight_notifs)
{
    int32_t result = INT32_MIN;
    uint32_t head = *r->cq_head;
    uint32_t tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    for (; head != tail; head++) {
        struct cqe *c = &r->cqes[head & r->cq_mask];
        if (c->flags & CQE_F_NOTIF) {
            r->notifications++;
            r->copied += ((uint32_t)c->res & NOTIF_USAGE_ZC_COPIED) != 0;
            (*in_flight_notifs)--;
        } else {
            result = c->res;
            if (c->flags & CQE_F_MORE)
                (*in_flight_notifs)++;
        }
    }
    __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    return result;
}

static void ring_register(struct ring *r, char *buf, size_t size)
{
    struct iovec reg = {.iov_base = buf, .iov_len = size};
    if (syscall(NR_REGISTER, r->fd, REGISTER_BUFFERS, &reg, 1) < 0)
        die("registering the buffer (RLIMIT_MEMLOCK?)", errno);
}

static uint64_t zc_loop(struct ring *r, int fd, char *buf, size_t size, double deadline)
{
    struct iovec iov;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    uint64_t messages = 0;
    int notifs = 0;
    do {
        size_t off = 0;
        while (off < size) {
            iov.iov_base = buf + off;
            iov.iov_len = size - off;
            struct sqe *s = &r->sqes[r->tail & r->sq_mask];
            memset(s, 0, sizeof(*s));
            s->opcode = OP_SENDMSG_ZC;
            s->fd = fd;
            s->addr = (uint64_t)(uintptr_t)&msg;
            s->len = 1;
            s->op_flags = MSG_WAITALL | MSG_NOSIGNAL;
            s->ioprio = RECVSEND_FIXED_BUF | SEND_ZC_REPORT_USAGE;
            s->buf_index = 0;
            r->tail++;
            __atomic_store_n(r->sq_tail, r->tail, __ATOMIC_RELEASE);
            int32_t res = INT32_MIN;
            if (ring_enter(r, 1, 1) < 0)
                die("io_uring_enter", errno);
            while ((res = ring_reap(r, &notifs)) == INT32_MIN)
                if (ring_enter(r, 0, 1) < 0 && errno != EINTR)
                    die("io_uring_enter", errno);
            if (res < 0)
                die("SENDMSG_ZC", -res);
            off += (size_t)res;
        }
        messages++;
    } while (now() < deadline);
    while (notifs > 0) {
        if (ring_enter(r, 0, 1) < 0 && errno != EINTR)
            die("io_uring_enter", errno);
        ring_reap(r, &notifs);
    }
    return messages;
}

int main(int argc, char **argv)
{
    if (argc != 6 || (strcmp(argv[1], "send") && strcmp(argv[1], "zc"))) {
        fprintf(stderr, "usage: csender send|zc HOST PORT SIZE SECONDS\n");
        return 2;
    }
    int zc = strcmp(argv[1], "zc") == 0;
    size_t size = strtoull(argv[4], NULL, 10);
    double seconds = strtod(argv[5], NULL);
    char *buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED)
        die("mmap payload", errno);
    memset(buf, 'x', size);
    struct ring r;
    if (zc) {
        ring_setup(&r, 64);
        ring_register(&r, buf, size);
    }
    int fd = connect_to(argv[2], argv[3]);
    double cpu0 = cpu_seconds(), t0 = now();
    uint64_t messages = zc ? zc_loop(&r, fd, buf, size, t0 + seconds)
                           : send_loop(fd, buf, size, t0 + seconds);
    uint64_t received = finish(fd);
    double elapsed = now() - t0, cpu = cpu_seconds() - cpu0;
    printf("{\"messages\": %llu, \"bytes_sent\": %llu, \"bytes_received\": %llu, "
           "\"elapsed\": %.9f, \"cpu\": %.6f, \"enter_calls\": %llu, "
           "\"notifications\": %llu, \"notifications_copied\": %llu}\n",
           (unsigned long long)messages, (unsigned long long)(messages * size),
           (unsigned long long)received, elapsed, cpu,
           (unsigned long long)(zc ? r.enters : 0), (unsigned long long)(zc ? r.notifications : 0),
           (unsigned long long)(zc ? r.copied : 0));
    close(fd);
    return 0;
}
