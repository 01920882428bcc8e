/*
 * LD_PRELOAD shim: turns every bind() to the wildcard address into a bind to
 * loopback. Built by scripts/flink/install.sh into
 * $FLINK_CLUSTER_DIR/lib/libloopback_bind.so and preloaded into the Flink and
 * Beam job-server JVMs by start_cluster.sh / start_taskmanager.sh.
 *
 * Why: Beam's Java gRPC servers (the job server's job and artifact services,
 * and the Fn API control/data/state/logging/provision servers that the Flink
 * runner opens inside each TaskManager) are built with
 * NettyServerBuilder.forPort(port), i.e. on all interfaces, whatever
 * --job-host says. No flag changes that, so the bind call itself is
 * rewritten:
 *   AF_INET   0.0.0.0 -> 127.0.0.1
 *   AF_INET6  ::      -> ::ffff:127.0.0.1 on a dual-stack socket (reachable
 *                        as 127.0.0.1, like Flink's own sockets), ::1 on an
 *                        IPv6-only socket.
 * Every other bind passes through unchanged. Set LOOPBACK_BIND_DEBUG=1 to log
 * each rewrite on stderr.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

static bind_fn real_bind(void) {
    static bind_fn fn = NULL;
    if (!fn) fn = (bind_fn)dlsym(RTLD_NEXT, "bind");
    return fn;
}

static int debug_enabled(void) {
    const char *v = getenv("LOOPBACK_BIND_DEBUG");
    return v && *v && *v != '0';
}

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    if (addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)addr;
        if (in->sin_addr.s_addr == htonl(INADDR_ANY)) {
            struct sockaddr_in copy;
            memcpy(&copy, in, sizeof(copy));
            copy.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            if (debug_enabled())
                fprintf(stderr, "loopback_bind: fd %d 0.0.0.0:%u -> 127.0.0.1\n", fd, ntohs(copy.sin_port));
            return real_bind()(fd, (const struct sockaddr *)&copy, sizeof(copy));
        }
    } else if (addr && addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)addr;
        if (IN6_IS_ADDR_UNSPECIFIED(&in6->sin6_addr)) {
            struct sockaddr_in6 copy;
            int v6only = 0;
            socklen_t optlen = sizeof(v6only);
            memcpy(&copy, in6, sizeof(copy));
            if (getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &optlen) == 0 && v6only) {
                copy.sin6_addr = in6addr_loopback;
            } else {
                memset(&copy.sin6_addr, 0, sizeof(copy.sin6_addr));
                copy.sin6_addr.s6_addr[10] = 0xff;
                copy.sin6_addr.s6_addr[11] = 0xff;
                copy.sin6_addr.s6_addr[12] = 127;
                copy.sin6_addr.s6_addr[15] = 1;
            }
            if (debug_enabled())
                fprintf(stderr, "loopback_bind: fd %d [::]:%u -> %s\n", fd, ntohs(copy.sin6_port),
                        v6only ? "[::1]" : "[::ffff:127.0.0.1]");
            return real_bind()(fd, (const struct sockaddr *)&copy, sizeof(copy));
        }
    }
    return real_bind()(fd, addr, len);
}
