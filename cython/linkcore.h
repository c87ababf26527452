/* The encrypted link's datagram layer (docs/vpn.md), in C: AES-256-GCM
 * through OpenSSL's EVP with one context per key, a replay window, and the
 * pump that moves Ethernet frames between a local end (a unix datagram
 * socket, qemu's -netdev dgram peer, or a TAP device) and a UDP socket,
 * in batches.  Wrapped by cython/link.pyx (cpushare._link). */
#ifndef CPS_LINKCORE_H
#define CPS_LINKCORE_H

#include <stddef.h>
#include <stdint.h>
#include <pthread.h>
#include <sys/socket.h>
#include <openssl/evp.h>

#define LK_VERSION        1
#define LK_TYPE_DATA      0          /* one Ethernet frame */
#define LK_TYPE_KEEPALIVE 1          /* empty */
#define LK_HEADER         14         /* version, type, link id (4), counter (8) */
#define LK_TAG            16
#define LK_OVERHEAD       (LK_HEADER + LK_TAG)
#define LK_KEY            32
#define LK_MIN_FRAME      14         /* an Ethernet header */
#define LK_MAX_FRAME      1522       /* 1500 + 14 + two VLAN tags, no FCS */
#define LK_MAX_DATAGRAM   (LK_OVERHEAD + LK_MAX_FRAME)
#define LK_WINDOW_BITS    1024       /* replay bitmap: a ring of 16 words */
#define LK_WINDOW         (LK_WINDOW_BITS - 64)  /* counters this far behind the top are judged */
#define LK_SLOT           2048       /* one buffer of a batch */
#define LK_READ_MAX       (LK_SLOT - LK_OVERHEAD)
#define LK_MAX_BATCH      256
#define LK_GRO_SLOT       65536      /* a receive buffer when UDP GRO coalesces datagrams */
#define LK_GSO_BYTES      65000      /* at most this much in one UDP GSO send */
#define LK_CTL            32         /* one message's control buffer (UDP_SEGMENT, UDP_GRO) */

/* Results of lk_seal / lk_open below zero. */
#define LK_E_EXHAUSTED  (-1)         /* the sealer's counter reached its limit */
#define LK_E_CRYPTO     (-2)         /* OpenSSL failed */
#define LK_E_MALFORMED  (-3)
#define LK_E_FORGED     (-4)
#define LK_E_REPLAYED   (-5)
#define LK_E_TOO_OLD    (-6)

typedef struct {
    EVP_CIPHER_CTX *ctx;             /* the key set once; each datagram sets only the IV */
    uint8_t salt[4];
    uint64_t counter;                /* the last one used; 0: none yet */
    uint64_t limit;                  /* the highest counter this key may seal */
    int attached;                    /* owned by a pump */
} lk_sealer;

typedef struct {
    EVP_CIPHER_CTX *ctx;
    uint8_t salt[4];
    uint64_t top;                    /* highest authenticated counter */
    uint64_t bits[LK_WINDOW_BITS / 64];
    uint64_t opened, malformed, forged, replayed, too_old;
    int attached;
} lk_opener;

typedef struct {
    uint8_t type;
    uint32_t link_id;
    uint64_t counter;
} lk_header;

/* A counter read from another thread than the pump's. */
uint64_t lk_load(const uint64_t *x);

int lk_sealer_init(lk_sealer *s, const uint8_t *key, uint32_t salt, uint64_t limit);
/* Raises the sealer's limit (never lowers it); safe while a pump seals. */
void lk_sealer_grant(lk_sealer *s, uint64_t limit);
void lk_sealer_free(lk_sealer *s);
int lk_opener_init(lk_opener *o, const uint8_t *key, uint32_t salt);
void lk_opener_free(lk_opener *o);

/* buf holds len bytes of payload at buf + LK_HEADER and room for the tag
 * after it; sealed in place.  Returns the datagram's length or LK_E_*. */
long lk_seal(lk_sealer *s, int type, uint32_t link_id, uint8_t *buf, size_t len);
/* Opens a datagram in place (the payload at buf + LK_HEADER): its length,
 * or LK_E_* (each counted in the opener). */
long lk_open(lk_opener *o, uint8_t *buf, size_t len, lk_header *h);

/* One link of a pump: its local end, its keys, its peer and its counters. */
typedef struct {
    uint32_t link_id;
    int fd;
    int is_sock;                     /* unix datagram socket; else a TAP (made O_NONBLOCK) */
    int dead;                        /* the local end failed: no longer polled */
    lk_sealer *sealer;
    lk_opener *opener;
    struct sockaddr_storage peer;
    socklen_t peer_len;              /* 0: no peer known yet */
    uint64_t frames_out, bytes_out;  /* local -> UDP */
    uint64_t frames_in, bytes_in;    /* UDP -> local */
    uint64_t keepalives_out, keepalives_in, peer_changes;
    uint64_t no_peer, exhausted, bad_frames, local_errors, send_errors;
    double last_heard, last_sent;    /* CLOCK_MONOTONIC seconds; 0: never */
} lk_link;

typedef struct {
    uint64_t malformed, unknown_link, udp_errors, rounds;
    uint64_t gso_sends, gro_receives;  /* sends of several datagrams, receives of several */
} lk_pump_counters;

typedef struct {
    int udp_fd, stop_fd;
    int batch, follow, running;
    int gso, gro;                    /* UDP segmentation offload on send, coalescing on receive */
    size_t gso_max;                  /* the largest datagram GSO may cut to (the path's MTU) */
    size_t rxslot;
    double keepalive;
    pthread_mutex_t mu;              /* held by the loop except while it polls */
    lk_link **links;                 /* sorted by link id */
    size_t n, cap;
    unsigned gen;                    /* bumped when the poll set changes */
    lk_pump_counters c;
    const char *err_call;
    uint8_t *rx, *tx;
    struct mmsghdr *rmsg, *tmsg, *omsg;
    struct iovec *riov, *tiov, *oiov;
    struct sockaddr_storage *raddr;
    uint8_t *rctl, *tctl;
} lk_pump;

lk_pump *lk_pump_new(int udp_fd, int batch, int follow, double keepalive);
void lk_pump_free(lk_pump *p);
int lk_pump_add(lk_pump *p, uint32_t link_id, int fd, lk_sealer *s, lk_opener *o,
                const struct sockaddr *peer, socklen_t peer_len);
int lk_pump_remove(lk_pump *p, uint32_t link_id);
int lk_pump_rekey(lk_pump *p, uint32_t link_id, lk_sealer *s, lk_opener *o,
                  lk_sealer **old_s, lk_opener **old_o);
int lk_pump_set_peer(lk_pump *p, uint32_t link_id, const struct sockaddr *peer, socklen_t len);
/* Copies of every link (at most max) and the pump's counters, taken under its lock. */
size_t lk_pump_snapshot(lk_pump *p, lk_link *out, size_t max, lk_pump_counters *c);
size_t lk_pump_count(lk_pump *p);
/* Runs until lk_pump_stop: 0, or -errno of the call named in err_call;
 * -EINTR when a signal interrupted it (call again). */
int lk_pump_run(lk_pump *p);
int lk_pump_stop(lk_pump *p);

#endif
