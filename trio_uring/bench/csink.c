/* The benchmark's receiver, in C: what every sender contender talks to.
 *
 * A receiver written in Python costs enough per call that it flatters the
 * slower senders (trio reached 3.2 GB/s at 1 MiB against the Python sink and
 * far less against this one), so the yardstick receiver has no interpreter.
 *
 * usage: csink HOST PORT [-v]
 *
 * Prints "sink listening on HOST:PORT" (the port actually bound, so PORT may
 * be 0) once it listens, then accepts forever.  Each connection gets its own
 * thread with a tight read() into a 1 MiB buffer; at end of stream the
 * thread answers with the byte count as 8 little-endian bytes and closes
 * (the protocol of sink.py).  A connection that fails (reset) is closed
 * without an answer.  With -v, each finished connection prints its count.
 *
 * Built by csink.py with gcc -O2 -pthread into a cache directory.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define RECV_BUFFER_SIZE (1 << 20)
#define ACK_SIZE 8
/* The buffer is on the heap, so a thread needs little stack; a small stack
 * keeps hundreds of connections cheap in address space. */
#define THREAD_STACK_SIZE (256 * 1024)

static int verbose;

static int write_all(int fd, const unsigned char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static void *serve(void *arg) {
    int fd = (int)(intptr_t)arg;
    char *buf = malloc(RECV_BUFFER_SIZE);
    uint64_t total = 0;
    int ok = buf != NULL;
    while (ok) {
        ssize_t r = read(fd, buf, RECV_BUFFER_SIZE);
        if (r > 0) {
            total += (uint64_t)r;
        } else if (r == 0) {
            break;
        } else if (errno != EINTR) {
            ok = 0;
        }
    }
    free(buf);
    if (ok) {
        unsigned char ack[ACK_SIZE];
        for (int i = 0; i < ACK_SIZE; i++)
            ack[i] = (unsigned char)(total >> (8 * i));
        ok = write_all(fd, ack, sizeof ack) == 0;
    }
    close(fd);
    if (ok && verbose) {
        printf("connection done: %llu bytes\n", (unsigned long long)total);
        fflush(stdout);
    }
    return NULL;
}

static int listen_on(const char *host, const char *port) {
    struct addrinfo hints = {0}, *res, *ai;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "csink: %s:%s: %s\n", host, port, gai_strerror(rc));
        return -1;
    }
    int s = -1;
    for (ai = res; ai != NULL; ai = ai->ai_next) {
        s = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (s < 0)
            continue;
        int one = 1;
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(s, ai->ai_addr, ai->ai_addrlen) == 0 && listen(s, 1024) == 0)
            break;
        close(s);
        s = -1;
    }
    freeaddrinfo(res);
    if (s < 0)
        perror("csink: bind/listen");
    return s;
}

int main(int argc, char **argv) {
    if (argc < 3 || argc > 4 || (argc == 4 && strcmp(argv[3], "-v") != 0)) {
        fprintf(stderr, "usage: %s HOST PORT [-v]\n", argv[0]);
        return 2;
    }
    verbose = argc == 4;
    /* A sender that vanishes before reading its count must not kill the sink. */
    signal(SIGPIPE, SIG_IGN);
    int s = listen_on(argv[1], argv[2]);
    if (s < 0)
        return 1;
    struct sockaddr_storage addr;
    socklen_t len = sizeof addr;
    if (getsockname(s, (struct sockaddr *)&addr, &len) != 0) {
        perror("csink: getsockname");
        return 1;
    }
    int port = ntohs(addr.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&addr)->sin6_port
                                                : ((struct sockaddr_in *)&addr)->sin_port);
    printf("sink listening on %s:%d\n", argv[1], port);
    fflush(stdout);

    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, THREAD_STACK_SIZE);
    for (;;) {
        int c = accept4(s, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            /* Out of descriptors or memory: wait for connections to finish. */
            perror("csink: accept");
            usleep(10000);
            continue;
        }
        pthread_t t;
        if (pthread_create(&t, &attr, serve, (void *)(intptr_t)c) != 0) {
            fprintf(stderr, "csink: cannot start a thread; connection dropped\n");
            close(c);
        }
    }
}
