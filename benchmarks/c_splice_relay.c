/*
 * A minimal C epoll + splice relay: the reference point of issue 5 ("a C splice loop with
 * 1 MiB pipes"), run beside the engine in relay_bench.py so the bar is measured in the same
 * run instead of quoted.
 *
 *     c_splice_relay LISTEN_ADDR LISTEN_PORT ORIGIN_ADDR ORIGIN_PORT PIPE_BYTES
 *
 * Deliberately the plainest loop that is still correct for a bulk benchmark: one thread, one
 * epoll set, edge-triggered; accept, blocking connect to the origin, TCP_NODELAY on both
 * sockets (as HAProxy and the engine), one pipe per direction enlarged with F_SETPIPE_SZ. On
 * any event of a pair both directions are pumped until the kernel says EAGAIN:
 * socket -> pipe (up to the pipe's size), pipe -> socket (all it holds). No timeouts, no
 * pools, no counters, no low-water mark: everything the engine adds is absent, which is the
 * point of the comparison. EOF is passed on with shutdown(SHUT_WR); a pair is closed once both
 * directions ended or on an error. Written for this project; benchmark use only.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_EVENTS 64

struct direction {
    int from, to;
    int pipe_read, pipe_write;
    size_t in_pipe;
    int eof; /* the source ended and the pipe was flushed: SHUT_WR sent */
};

struct pair {
    int fds[2]; /* 0: client, 1: origin */
    struct direction dirs[2]; /* 0: client -> origin, 1: origin -> client */
    int closed; /* freed after the batch: a later event of the same batch may name it */
};

static int pipe_bytes;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void set_nonblocking_nodelay(int fd) {
    int one = 1;
    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0)
        die("fcntl");
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* Moves what it can; returns 0 while the direction lives, 1 once done, -1 on an error. */
static int pump(struct direction *d) {
    for (;;) {
        if (d->in_pipe > 0) {
            ssize_t n = splice(d->pipe_read, NULL, d->to, NULL, d->in_pipe,
                               SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (n < 0)
                return errno == EAGAIN ? 0 : -1;
            d->in_pipe -= (size_t)n;
            if (d->in_pipe > 0)
                return 0; /* the destination is full: wait for EPOLLOUT */
        }
        if (d->eof)
            return 1;
        ssize_t n = splice(d->from, NULL, d->pipe_write, NULL, (size_t)pipe_bytes,
                           SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n == 0) {
            d->eof = 1;
            shutdown(d->to, SHUT_WR);
            return 1;
        }
        if (n < 0)
            return errno == EAGAIN ? 0 : -1;
        d->in_pipe += (size_t)n;
    }
}

static void close_pair(int epoll_fd, struct pair *p) {
    for (int k = 0; k < 2; k++) {
        epoll_ctl(epoll_fd, EPOLL_CTL_DEL, p->fds[k], NULL);
        close(p->fds[k]);
        close(p->dirs[k].pipe_read);
        close(p->dirs[k].pipe_write);
    }
    p->closed = 1;
}

static struct pair *open_pair(int client, const struct sockaddr_in *origin) {
    int upstream = socket(AF_INET, SOCK_STREAM, 0);
    if (upstream < 0 || connect(upstream, (const struct sockaddr *)origin, sizeof(*origin)) < 0) {
        perror("connect");
        if (upstream >= 0)
            close(upstream);
        return NULL;
    }
    struct pair *p = calloc(1, sizeof(*p));
    if (!p)
        die("calloc");
    p->fds[0] = client;
    p->fds[1] = upstream;
    for (int k = 0; k < 2; k++) {
        int fds[2];
        if (pipe2(fds, O_NONBLOCK) < 0)
            die("pipe2");
        fcntl(fds[1], F_SETPIPE_SZ, pipe_bytes);
        p->dirs[k] = (struct direction){.from = p->fds[k], .to = p->fds[1 - k],
                                        .pipe_read = fds[0], .pipe_write = fds[1]};
        set_nonblocking_nodelay(p->fds[k]);
    }
    return p;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s LISTEN_ADDR LISTEN_PORT ORIGIN_ADDR ORIGIN_PORT PIPE_BYTES\n",
                argv[0]);
        return 2;
    }
    struct sockaddr_in listen_at = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    struct sockaddr_in origin = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[4]))};
    if (inet_pton(AF_INET, argv[1], &listen_at.sin_addr) != 1 ||
        inet_pton(AF_INET, argv[3], &origin.sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address\n");
        return 2;
    }
    pipe_bytes = atoi(argv[5]);

    int listener = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(listener, (struct sockaddr *)&listen_at, sizeof(listen_at)) < 0)
        die("bind");
    if (listen(listener, 128) < 0)
        die("listen");
    int epoll_fd = epoll_create1(0);
    struct epoll_event listen_event = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epoll_fd, EPOLL_CTL_ADD, listener, &listen_event);

    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int ready = epoll_wait(epoll_fd, events, MAX_EVENTS, -1);
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        struct pair *closed[MAX_EVENTS];
        int closed_count = 0;
        for (int i = 0; i < ready; i++) {
            struct pair *p = events[i].data.ptr;
            if (p != NULL && p->closed)
                continue;
            if (p == NULL) {
                int client = accept(listener, NULL, NULL);
                if (client < 0)
                    continue;
                p = open_pair(client, &origin);
                if (!p) {
                    close(client);
                    continue;
                }
                for (int k = 0; k < 2; k++) {
                    struct epoll_event event = {
                        .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = p};
                    epoll_ctl(epoll_fd, EPOLL_CTL_ADD, p->fds[k], &event);
                }
            }
            int done = 0, failed = 0;
            for (int k = 0; k < 2; k++) {
                int result = pump(&p->dirs[k]);
                done += result == 1;
                failed |= result < 0;
            }
            if (failed || done == 2 || (events[i].events & EPOLLERR)) {
                close_pair(epoll_fd, p);
                closed[closed_count++] = p;
            }
        }
        for (int i = 0; i < closed_count; i++)
            free(closed[i]);
    }
}
