/*
 * A one-packet-per-system-call udp forwarder in C: the benchmark's stand-in for
 * flannel's own C proxy (written here from the spec's description of its design, §6.3:
 * poll() on the TUN and the socket, one read + one sendto per packet towards the wire,
 * one recv + one write per datagram towards the TUN, TTL decremented on each side, no
 * offloads, no batching). bench/dataplane.py compiles it with gcc and runs it as the
 * "cproxy-udp" configuration, so Loden's udp backend is compared with that design in
 * the same run instead of with a figure measured elsewhere.
 *
 *     c_proxy <tun name> <bind IPv4> <port> <subnet/len>=<peer IPv4> ...
 *
 * Prints "ready" once the TUN exists and the socket is bound; the caller adds the
 * device's address, MTU and route. Runs until killed.
 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

struct peer {
    uint32_t net, mask;
    struct sockaddr_in addr;
};

static int dec_ttl(uint8_t *p) {
    if (p[8] <= 1) {
        return 0;
    }
    p[8] -= 1;
    uint32_t sum = (((uint32_t)p[10] << 8) | p[11]) + 0x0100;
    sum = (sum & 0xFFFF) + (sum >> 16);
    if (sum == 0xFFFF) {
        sum = 0;
    }
    p[10] = (uint8_t)(sum >> 8);
    p[11] = (uint8_t)sum;
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s TUN BIND_IP PORT SUBNET/LEN=PEER_IP...\n", argv[0]);
        return 2;
    }
    int npeers = argc - 4;
    struct peer *peers = calloc((size_t)npeers, sizeof(*peers));
    int port = atoi(argv[3]);
    for (int i = 0; i < npeers; i++) {
        char spec[128];
        snprintf(spec, sizeof(spec), "%s", argv[4 + i]);
        char *eq = strchr(spec, '='), *slash = strchr(spec, '/');
        if (eq == NULL || slash == NULL || slash > eq) {
            fprintf(stderr, "bad peer %s\n", argv[4 + i]);
            return 2;
        }
        *eq = *slash = '\0';
        struct in_addr net;
        int len = atoi(slash + 1);
        if (inet_pton(AF_INET, spec, &net) != 1 || len < 0 || len > 32) {
            fprintf(stderr, "bad subnet in %s\n", argv[4 + i]);
            return 2;
        }
        peers[i].mask = len ? 0xFFFFFFFFu << (32 - len) : 0;
        peers[i].net = ntohl(net.s_addr) & peers[i].mask;
        peers[i].addr.sin_family = AF_INET;
        peers[i].addr.sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, eq + 1, &peers[i].addr.sin_addr) != 1) {
            fprintf(stderr, "bad peer IP in %s\n", argv[4 + i]);
            return 2;
        }
    }
    int tun = open("/dev/net/tun", O_RDWR);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", argv[1]);
    if (tun < 0 || ioctl(tun, TUNSETIFF, &ifr) < 0) {
        perror("tun");
        return 1;
    }
    int sock = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in me = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, argv[2], &me.sin_addr) != 1 ||
        bind(sock, (struct sockaddr *)&me, sizeof(me)) < 0) {
        perror("bind");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    uint8_t buf[65536];
    struct pollfd fds[2] = {{.fd = tun, .events = POLLIN}, {.fd = sock, .events = POLLIN}};
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            continue;
        }
        if (fds[0].revents & POLLIN) {
            ssize_t n = read(tun, buf, sizeof(buf));
            if (n >= 20 && buf[0] >> 4 == 4) {
                uint32_t dst = ((uint32_t)buf[16] << 24) | ((uint32_t)buf[17] << 16) |
                               ((uint32_t)buf[18] << 8) | buf[19];
                for (int i = 0; i < npeers; i++) {
                    if ((dst & peers[i].mask) == peers[i].net) {
                        if (dec_ttl(buf)) {
                            sendto(sock, buf, (size_t)n, 0, (struct sockaddr *)&peers[i].addr,
                                   sizeof(peers[i].addr));
                        }
                        break;
                    }
                }
            }
        }
        if (fds[1].revents & POLLIN) {
            ssize_t n = recv(sock, buf, sizeof(buf), 0);
            if (n >= 20 && dec_ttl(buf)) {
                if (write(tun, buf, (size_t)n) < 0) {
                    /* a full TUN queue drops the packet, as in flannel */
                }
            }
        }
    }
}
