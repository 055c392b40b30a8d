# The C declarations the relay engine uses, all in one place (uvloop keeps its libc/libuv
# declarations in includes/*.pxd the same way). Cython's bundled posix/*.pxd cover neither epoll,
# splice, eventfd nor sockets, so they are declared here. Every function is `nogil`: the worker
# loop calls them with the GIL released.

from libc.stdint cimport uint32_t, uint64_t


cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EINTR
        EINVAL
        ENOSYS
        EBADF
        ENOENT
        ENOMEM
        ENOSPC
        EMFILE
        ENFILE
        EPIPE
        EBUSY
        ENOTSOCK
        ENOTCONN
        ECONNRESET
        ECONNABORTED
        ESHUTDOWN


cdef extern from "<unistd.h>" nogil:
    ctypedef long ssize_t
    int close(int fd)
    ssize_t read(int fd, void* buf, size_t count)
    ssize_t write(int fd, const void* buf, size_t count)


cdef extern from "<fcntl.h>" nogil:
    # Python.h defines _GNU_SOURCE before this header is included, which exposes splice(),
    # pipe2() and F_SETPIPE_SZ.
    ctypedef long long loff_t
    enum:
        O_NONBLOCK
        O_CLOEXEC
        F_SETPIPE_SZ
        F_GETPIPE_SZ
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
        SPLICE_F_MORE
    int fcntl(int fd, int cmd, ...)
    int pipe2(int* pipefd, int flags)
    ssize_t splice(int fd_in, loff_t* off_in, int fd_out, loff_t* off_out, size_t length,
                   unsigned int flags)


cdef extern from "<sys/ioctl.h>" nogil:
    enum:
        FIONBIO
    int ioctl(int fd, unsigned long request, ...)


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLLET
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CTL_MOD
        EPOLL_CLOEXEC

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)


cdef extern from "<sys/eventfd.h>" nogil:
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t

    struct linger:
        int l_onoff
        int l_linger

    enum:
        SOL_SOCKET
        SO_ERROR
        SO_LINGER
        SO_RCVLOWAT
        SHUT_WR
        MSG_NOSIGNAL
        MSG_DONTWAIT

    int shutdown(int fd, int how)
    int getsockopt(int fd, int level, int optname, void* optval, socklen_t* optlen)
    int setsockopt(int fd, int level, int optname, const void* optval, socklen_t optlen)
    ssize_t send(int fd, const void* buf, size_t length, int flags)


cdef extern from "<signal.h>" nogil:
    ctypedef struct sigset_t:
        pass
    enum:
        SIG_BLOCK
    int sigfillset(sigset_t* mask)
    int pthread_sigmask(int how, const sigset_t* newmask, sigset_t* oldmask)


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    ctypedef struct pthread_condattr_t:
        pass
    int pthread_mutex_init(pthread_mutex_t* mutex, const pthread_mutexattr_t* attr)
    int pthread_mutex_destroy(pthread_mutex_t* mutex)
    int pthread_mutex_lock(pthread_mutex_t* mutex)
    int pthread_mutex_unlock(pthread_mutex_t* mutex)
    int pthread_cond_init(pthread_cond_t* cond, const pthread_condattr_t* attr)
    int pthread_cond_destroy(pthread_cond_t* cond)
    int pthread_cond_wait(pthread_cond_t* cond, pthread_mutex_t* mutex)
    int pthread_cond_broadcast(pthread_cond_t* cond)


cdef extern from "relay_compat.h" nogil:
    void relay_counter_add(uint64_t* counter, uint64_t amount)
    uint64_t relay_counter_get(uint64_t* counter)
    void relay_u32_set(uint32_t* value, uint32_t new_value)
    uint32_t relay_u32_get(uint32_t* value)
    double relay_monotonic_s()
