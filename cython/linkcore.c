/* The encrypted link's datagram layer: see linkcore.h and docs/vpn.md. */
#define _GNU_SOURCE
#include "linkcore.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <sys/eventfd.h>
#include <sys/stat.h>

#include <openssl/crypto.h>

/* Counters are written by the pump's thread alone and read by others. */
#define BUMP(x)     __atomic_store_n(&(x), (x) + 1, __ATOMIC_RELAXED)
#define ADD(x, v)   __atomic_store_n(&(x), (x) + (v), __ATOMIC_RELAXED)

static inline void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static inline uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline void put_be64(uint8_t *p, uint64_t v)
{
    put_be32(p, v >> 32);
    put_be32(p + 4, (uint32_t)v);
}

static inline uint64_t get_be64(const uint8_t *p)
{
    return (uint64_t)get_be32(p) << 32 | get_be32(p + 4);
}

static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- AEAD ---- */

static EVP_CIPHER_CTX *gcm_ctx(const uint8_t *key, int enc)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!ctx)
        return NULL;
    if (!EVP_CipherInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, NULL, enc)) {
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

int lk_sealer_init(lk_sealer *s, const uint8_t *key, uint32_t salt, uint64_t limit)
{
    memset(s, 0, sizeof *s);
    put_be32(s->salt, salt);
    s->limit = limit;
    s->ctx = gcm_ctx(key, 1);
    return s->ctx ? 0 : -1;
}

void lk_sealer_free(lk_sealer *s)
{
    EVP_CIPHER_CTX_free(s->ctx);       /* cleanses the key schedule */
    s->ctx = NULL;
}

uint64_t lk_load(const uint64_t *x)
{
    return __atomic_load_n(x, __ATOMIC_RELAXED);
}

void lk_sealer_grant(lk_sealer *s, uint64_t limit)
{
    uint64_t old = __atomic_load_n(&s->limit, __ATOMIC_RELAXED);
    while (limit > old
           && !__atomic_compare_exchange_n(&s->limit, &old, limit, 0, __ATOMIC_RELEASE,
                                           __ATOMIC_RELAXED))
        ;
}

int lk_opener_init(lk_opener *o, const uint8_t *key, uint32_t salt)
{
    memset(o, 0, sizeof *o);
    put_be32(o->salt, salt);
    o->ctx = gcm_ctx(key, 0);
    return o->ctx ? 0 : -1;
}

void lk_opener_free(lk_opener *o)
{
    EVP_CIPHER_CTX_free(o->ctx);
    o->ctx = NULL;
}

long lk_seal(lk_sealer *s, int type, uint32_t link_id, uint8_t *buf, size_t len)
{
    uint8_t iv[12];
    int outl;
    uint64_t c;

    if (s->counter >= __atomic_load_n(&s->limit, __ATOMIC_ACQUIRE))
        return LK_E_EXHAUSTED;
    c = s->counter + 1;                /* spent even if OpenSSL fails below */
    __atomic_store_n(&s->counter, c, __ATOMIC_RELAXED);
    buf[0] = LK_VERSION;
    buf[1] = (uint8_t)type;
    put_be32(buf + 2, link_id);
    put_be64(buf + 6, c);
    memcpy(iv, s->salt, 4);
    memcpy(iv + 4, buf + 6, 8);
    if (!EVP_EncryptInit_ex(s->ctx, NULL, NULL, NULL, iv)
        || !EVP_EncryptUpdate(s->ctx, NULL, &outl, buf, LK_HEADER)
        || (len && !EVP_EncryptUpdate(s->ctx, buf + LK_HEADER, &outl, buf + LK_HEADER, (int)len))
        || !EVP_EncryptFinal_ex(s->ctx, buf + LK_HEADER + len, &outl)
        || !EVP_CIPHER_CTX_ctrl(s->ctx, EVP_CTRL_GCM_GET_TAG, LK_TAG, buf + LK_HEADER + len))
        return LK_E_CRYPTO;
    return (long)(len + LK_OVERHEAD);
}

/* The replay window (WireGuard's): a ring of 64-bit words; the word of the
 * top counter and the 15 before it are kept, so a counter up to LK_WINDOW
 * behind the top is judged by its bit; older ones are refused. */
#define WORDS (LK_WINDOW_BITS / 64)

static int replay_check(const lk_opener *o, uint64_t c)
{
    if (c > o->top)
        return 0;
    if (o->top - c > LK_WINDOW)
        return LK_E_TOO_OLD;
    if (o->bits[(c >> 6) & (WORDS - 1)] & (1ULL << (c & 63)))
        return LK_E_REPLAYED;
    return 0;
}

static void replay_update(lk_opener *o, uint64_t c)
{
    uint64_t idx = c >> 6;
    if (c > o->top) {
        uint64_t cur = o->top >> 6, d = idx - cur;
        if (d > WORDS)
            d = WORDS;
        for (uint64_t i = 1; i <= d; i++)
            o->bits[(cur + i) & (WORDS - 1)] = 0;
        o->top = c;
    }
    o->bits[idx & (WORDS - 1)] |= 1ULL << (c & 63);
}

long lk_open(lk_opener *o, uint8_t *buf, size_t len, lk_header *h)
{
    uint8_t iv[12];
    int outl, r;
    size_t plen;
    uint64_t c;

    if (len < LK_OVERHEAD || len > LK_MAX_DATAGRAM || buf[0] != LK_VERSION
        || buf[1] > LK_TYPE_KEEPALIVE)
        goto malformed;
    plen = len - LK_OVERHEAD;
    if (buf[1] == LK_TYPE_DATA ? plen < LK_MIN_FRAME : plen != 0)
        goto malformed;
    c = get_be64(buf + 6);
    if (c == 0)
        goto malformed;
    if ((r = replay_check(o, c)) < 0) {
        if (r == LK_E_TOO_OLD)
            BUMP(o->too_old);
        else
            BUMP(o->replayed);
        return r;
    }
    memcpy(iv, o->salt, 4);
    memcpy(iv + 4, buf + 6, 8);
    if (!EVP_DecryptInit_ex(o->ctx, NULL, NULL, NULL, iv)
        || !EVP_DecryptUpdate(o->ctx, NULL, &outl, buf, LK_HEADER)
        || (plen && !EVP_DecryptUpdate(o->ctx, buf + LK_HEADER, &outl, buf + LK_HEADER, (int)plen))
        || !EVP_CIPHER_CTX_ctrl(o->ctx, EVP_CTRL_GCM_SET_TAG, LK_TAG, buf + LK_HEADER + plen)
        || EVP_DecryptFinal_ex(o->ctx, buf + LK_HEADER + plen, &outl) <= 0) {
        BUMP(o->forged);
        return LK_E_FORGED;
    }
    replay_update(o, c);
    BUMP(o->opened);
    h->type = buf[1];
    h->link_id = get_be32(buf + 2);
    h->counter = c;
    return (long)plen;
malformed:
    BUMP(o->malformed);
    return LK_E_MALFORMED;
}

/* ---- the pump ---- */

lk_pump *lk_pump_new(int udp_fd, int batch, int follow, double keepalive)
{
    lk_pump *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->udp_fd = udp_fd;
    p->batch = batch < 1 ? 1 : batch > LK_MAX_BATCH ? LK_MAX_BATCH : batch;
    p->follow = follow;
    p->keepalive = keepalive;
    p->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    pthread_mutex_init(&p->mu, NULL);
    /* UDP GSO is tried on the first batch (and dropped if the path refuses
     * it); GRO needs receive buffers of 64 KiB, touched only as far as used. */
    p->gso = 1;
    p->gso_max = LK_MAX_DATAGRAM;
    p->gro = setsockopt(udp_fd, IPPROTO_UDP, UDP_GRO, &(int){1}, sizeof(int)) == 0;
    p->rxslot = p->gro ? LK_GRO_SLOT : LK_SLOT;
    p->rctl = calloc(p->batch, LK_CTL);
    p->tctl = calloc(p->batch, LK_CTL);
    p->rx = aligned_alloc(64, (size_t)p->batch * p->rxslot);
    p->tx = aligned_alloc(64, (size_t)p->batch * LK_SLOT);
    p->rmsg = calloc(p->batch, sizeof *p->rmsg);
    p->tmsg = calloc(p->batch, sizeof *p->tmsg);
    p->omsg = calloc(p->batch, sizeof *p->omsg);
    p->riov = calloc(p->batch, sizeof *p->riov);
    p->tiov = calloc(p->batch, sizeof *p->tiov);
    p->oiov = calloc(p->batch, sizeof *p->oiov);
    p->raddr = calloc(p->batch, sizeof *p->raddr);
    if (p->stop_fd < 0 || !p->rx || !p->tx || !p->rmsg || !p->tmsg || !p->omsg || !p->riov
        || !p->tiov || !p->oiov || !p->raddr || !p->rctl || !p->tctl) {
        int e = p->stop_fd < 0 ? errno : ENOMEM;
        lk_pump_free(p);
        errno = e;
        return NULL;
    }
    return p;
}

void lk_pump_free(lk_pump *p)
{
    if (!p)
        return;
    if (p->stop_fd >= 0)
        close(p->stop_fd);
    for (size_t i = 0; i < p->n; i++) {
        p->links[i]->sealer->attached = p->links[i]->opener->attached = 0;
        free(p->links[i]);
    }
    free(p->links);
    if (p->rx)
        OPENSSL_cleanse(p->rx, (size_t)p->batch * p->rxslot);
    if (p->tx)
        OPENSSL_cleanse(p->tx, (size_t)p->batch * LK_SLOT);
    free(p->rx); free(p->tx);
    free(p->rmsg); free(p->tmsg); free(p->omsg);
    free(p->riov); free(p->tiov); free(p->oiov); free(p->raddr);
    free(p->rctl); free(p->tctl);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

/* The index of link_id in the sorted table, or where it would go (*found 0). */
static size_t find_index(const lk_pump *p, uint32_t id, int *found)
{
    size_t lo = 0, hi = p->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (p->links[mid]->link_id < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    *found = lo < p->n && p->links[lo]->link_id == id;
    return lo;
}

static lk_link *find(const lk_pump *p, uint32_t id)
{
    int found;
    size_t i;
    if (p->n == 1)
        return p->links[0]->link_id == id ? p->links[0] : NULL;
    i = find_index(p, id, &found);
    return found ? p->links[i] : NULL;
}

static void wake(lk_pump *p)
{
    uint64_t one = 1;
    ssize_t r = write(p->stop_fd, &one, sizeof one);
    (void)r;
}

int lk_pump_add(lk_pump *p, uint32_t link_id, int fd, lk_sealer *s, lk_opener *o,
                const struct sockaddr *peer, socklen_t peer_len)
{
    struct stat st;
    lk_link *l;
    size_t i;
    int found, r = 0;

    if (fstat(fd, &st) < 0)
        return -errno;
    if (peer_len > sizeof l->peer)
        return -EINVAL;
    if (!S_ISSOCK(st.st_mode)) {
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
            return -errno;
    }
    pthread_mutex_lock(&p->mu);
    i = find_index(p, link_id, &found);
    if (found) {
        r = -EEXIST;
        goto out;
    }
    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 4;
        lk_link **nl = realloc(p->links, cap * sizeof *nl);
        if (!nl) {
            r = -ENOMEM;
            goto out;
        }
        p->links = nl;
        p->cap = cap;
    }
    if (!(l = calloc(1, sizeof *l))) {
        r = -ENOMEM;
        goto out;
    }
    l->link_id = link_id;
    l->fd = fd;
    l->is_sock = S_ISSOCK(st.st_mode);
    l->sealer = s;
    l->opener = o;
    if (peer_len) {
        memcpy(&l->peer, peer, peer_len);
        l->peer_len = peer_len;
    }
    s->attached = o->attached = 1;
    memmove(p->links + i + 1, p->links + i, (p->n - i) * sizeof *p->links);
    p->links[i] = l;
    p->n++;
    p->gen++;
    wake(p);
out:
    pthread_mutex_unlock(&p->mu);
    return r;
}

int lk_pump_remove(lk_pump *p, uint32_t link_id)
{
    int found;
    size_t i;
    pthread_mutex_lock(&p->mu);
    i = find_index(p, link_id, &found);
    if (found) {
        lk_link *l = p->links[i];
        l->sealer->attached = l->opener->attached = 0;
        free(l);
        memmove(p->links + i, p->links + i + 1, (p->n - i - 1) * sizeof *p->links);
        p->n--;
        p->gen++;
        wake(p);
    }
    pthread_mutex_unlock(&p->mu);
    return found ? 0 : -ENOENT;
}

int lk_pump_rekey(lk_pump *p, uint32_t link_id, lk_sealer *s, lk_opener *o,
                  lk_sealer **old_s, lk_opener **old_o)
{
    lk_link *l;
    pthread_mutex_lock(&p->mu);
    if ((l = find(p, link_id))) {
        *old_s = l->sealer;
        *old_o = l->opener;
        l->sealer->attached = l->opener->attached = 0;
        l->sealer = s;
        l->opener = o;
        s->attached = o->attached = 1;
    }
    pthread_mutex_unlock(&p->mu);
    return l ? 0 : -ENOENT;
}

int lk_pump_set_peer(lk_pump *p, uint32_t link_id, const struct sockaddr *peer, socklen_t len)
{
    lk_link *l;
    if (len > sizeof l->peer)
        return -EINVAL;
    pthread_mutex_lock(&p->mu);
    if ((l = find(p, link_id))) {
        memcpy(&l->peer, peer, len);
        l->peer_len = len;
    }
    pthread_mutex_unlock(&p->mu);
    return l ? 0 : -ENOENT;
}

size_t lk_pump_snapshot(lk_pump *p, lk_link *out, size_t max, lk_pump_counters *c)
{
    size_t n;
    pthread_mutex_lock(&p->mu);
    n = p->n < max ? p->n : max;
    for (size_t i = 0; i < n; i++)
        out[i] = *p->links[i];
    *c = p->c;
    pthread_mutex_unlock(&p->mu);
    return n;
}

size_t lk_pump_count(lk_pump *p)
{
    size_t n;
    pthread_mutex_lock(&p->mu);
    n = p->n;
    pthread_mutex_unlock(&p->mu);
    return n;
}

int lk_pump_stop(lk_pump *p)
{
    uint64_t v = 1ULL << 32;           /* more than the wake-ups of add and remove */
    return write(p->stop_fd, &v, sizeof v) == sizeof v ? 0 : -errno;
}

/* A send that found the socket full waits for room, at most LK_BLOCK_MS
 * for one batch: then the rest of the batch is dropped (and counted)
 * rather than stall every link of the pump. */
#define LK_BLOCK_MS 10

static int room(int fd, double *deadline)
{
    struct pollfd q = {.fd = fd, .events = POLLOUT};
    double now = mono(), left;
    if (*deadline == 0)
        *deadline = now + LK_BLOCK_MS / 1000.0;
    left = *deadline - now;
    return left > 0 && poll(&q, 1, (int)(left * 1000) + 1) > 0;
}

/* Sends the n sealed datagrams of tiov[] to one link's peer.  A run of
 * datagrams of one length (and a shorter last one) goes as one UDP GSO
 * message: the kernel cuts it into datagrams past its own stack. */
static void send_all(lk_pump *p, lk_link *l, int n)
{
    double deadline = 0;
    int m = 0, done = 0;
    int count[LK_MAX_BATCH];

    for (int i = 0; i < n; m++) {
        size_t len = p->tiov[i].iov_len, total = len;
        int j = i + 1;
        if (p->gso && len <= p->gso_max) {
            while (j < n && p->tiov[j].iov_len == len && total + len <= LK_GSO_BYTES) {
                total += len;
                j++;
            }
            if (j < n && j - i > 1 && p->tiov[j].iov_len < len
                && total + p->tiov[j].iov_len <= LK_GSO_BYTES)
                j++;
        }
        p->tmsg[m].msg_hdr = (struct msghdr){
            .msg_name = &l->peer, .msg_namelen = l->peer_len,
            .msg_iov = &p->tiov[i], .msg_iovlen = j - i,
        };
        if (j - i > 1) {
            struct cmsghdr *c = (struct cmsghdr *)(p->tctl + (size_t)m * LK_CTL);
            c->cmsg_level = IPPROTO_UDP;
            c->cmsg_type = UDP_SEGMENT;
            c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            *(uint16_t *)CMSG_DATA(c) = (uint16_t)len;
            p->tmsg[m].msg_hdr.msg_control = c;
            p->tmsg[m].msg_hdr.msg_controllen = CMSG_SPACE(sizeof(uint16_t));
        }
        count[m] = j - i;
        i = j;
    }
    while (done < m) {
        int r = sendmmsg(p->udp_fd, p->tmsg + done, m - done, MSG_DONTWAIT);
        if (r > 0) {
            for (int k = done; k < done + r; k++)
                if (count[k] > 1)
                    BUMP(p->c.gso_sends);
            done += r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == ENOBUFS) && room(p->udp_fd, &deadline))
            continue;
        if (r < 0 && count[done] > 1 && (errno == EMSGSIZE || errno == EINVAL || errno == EIO
                                          || errno == EOPNOTSUPP)) {
            /* GSO does not fragment: EMSGSIZE (or EINVAL) says these
             * datagrams are larger than the path's MTU (IP fragments them
             * when sent one by one); EIO or EOPNOTSUPP, that the path does
             * no UDP GSO at all. */
            struct msghdr *h = &p->tmsg[done].msg_hdr;
            if (errno == EMSGSIZE || errno == EINVAL)
                p->gso_max = h->msg_iov[0].iov_len - 1;
            else
                p->gso = 0;
            for (size_t k = 0; k < h->msg_iovlen; k++)
                if (sendto(p->udp_fd, h->msg_iov[k].iov_base, h->msg_iov[k].iov_len, MSG_DONTWAIT,
                           h->msg_name, h->msg_namelen) < 0)
                    BUMP(l->send_errors);
            done++;
            continue;
        }
        ADD(l->send_errors, count[done]);  /* these are lost; the rest are tried */
        done++;
    }
}

static void keepalives(lk_pump *p, double now)
{
    uint8_t buf[LK_OVERHEAD];
    for (size_t i = 0; i < p->n; i++) {
        lk_link *l = p->links[i];
        if (!l->peer_len || now - l->last_sent < p->keepalive)
            continue;
        l->last_sent = now;
        if (lk_seal(l->sealer, LK_TYPE_KEEPALIVE, l->link_id, buf, 0) < 0) {
            BUMP(l->exhausted);
            continue;
        }
        if (sendto(p->udp_fd, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr *)&l->peer,
                   l->peer_len) < 0)
            BUMP(l->send_errors);
        else
            BUMP(l->keepalives_out);
    }
}

/* Frames written to a unix socket are sent in one sendmmsg per run of
 * datagrams of the same link. */
static void flush_local(lk_link *l, struct mmsghdr *m, int n)
{
    double deadline = 0;
    int done = 0;
    while (done < n) {
        int r = sendmmsg(l->fd, m + done, n - done, MSG_DONTWAIT);
        if (r > 0) {
            done += r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno == EAGAIN && room(l->fd, &deadline))
            continue;
        BUMP(l->local_errors);         /* the reader is not keeping up, or gone */
        done++;
    }
}

/* Frames for a unix socket wait in omsg[] and go in one sendmmsg per run
 * of one link's frames. */
typedef struct {
    lk_link *run;
    int pending;
} lk_out;

static void out_flush(lk_pump *p, lk_out *o)
{
    if (o->pending)
        flush_local(o->run, p->omsg, o->pending);
    o->pending = 0;
}

static void one_datagram(lk_pump *p, uint8_t *b, size_t len, const struct msghdr *mh,
                         double now, lk_out *o)
{
    lk_header h;
    lk_link *l;
    long plen;

    if (len < LK_OVERHEAD || b[0] != LK_VERSION) {
        BUMP(p->c.malformed);
        return;
    }
    if (!(l = find(p, get_be32(b + 2)))) {
        BUMP(p->c.unknown_link);
        return;
    }
    if ((plen = lk_open(l->opener, b, len, &h)) < 0)
        return;                        /* counted by the opener */
    l->last_heard = now;
    if (p->follow && (l->peer_len != mh->msg_namelen
                      || memcmp(&l->peer, mh->msg_name, mh->msg_namelen))) {
        memcpy(&l->peer, mh->msg_name, mh->msg_namelen);
        l->peer_len = mh->msg_namelen;
        BUMP(l->peer_changes);
    }
    if (h.type == LK_TYPE_KEEPALIVE) {
        BUMP(l->keepalives_in);
        return;
    }
    if (l->dead) {
        BUMP(l->local_errors);
        return;
    }
    BUMP(l->frames_in);
    ADD(l->bytes_in, plen);
    if (!l->is_sock) {
        if (write(l->fd, b + LK_HEADER, plen) < 0)
            BUMP(l->local_errors);
        return;
    }
    if (o->run != l || o->pending == p->batch)
        out_flush(p, o);
    o->run = l;
    p->oiov[o->pending] = (struct iovec){b + LK_HEADER, (size_t)plen};
    p->omsg[o->pending].msg_hdr = (struct msghdr){.msg_iov = &p->oiov[o->pending], .msg_iovlen = 1};
    o->pending++;
}

/* The size of the datagrams GRO coalesced into one message, or 0. */
static size_t gro_size(struct msghdr *mh)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c))
        if (c->cmsg_level == IPPROTO_UDP && c->cmsg_type == UDP_GRO)
            return (size_t)*(int *)CMSG_DATA(c);
    return 0;
}

static void udp_in(lk_pump *p, double now)
{
    lk_out o = {NULL, 0};
    int n;

    for (int i = 0; i < p->batch; i++) {
        p->riov[i].iov_base = p->rx + (size_t)i * p->rxslot;
        p->riov[i].iov_len = p->rxslot;
        p->rmsg[i].msg_hdr = (struct msghdr){
            .msg_name = &p->raddr[i], .msg_namelen = sizeof p->raddr[i],
            .msg_iov = &p->riov[i], .msg_iovlen = 1,
            .msg_control = p->rctl + (size_t)i * LK_CTL, .msg_controllen = LK_CTL,
        };
    }
    n = recvmmsg(p->udp_fd, p->rmsg, p->batch, MSG_DONTWAIT, NULL);
    if (n < 0) {
        if (errno != EAGAIN && errno != EINTR)
            BUMP(p->c.udp_errors);
        return;
    }
    for (int i = 0; i < n; i++) {
        uint8_t *b = p->rx + (size_t)i * p->rxslot;
        size_t len = p->rmsg[i].msg_len, seg;
        struct msghdr *mh = &p->rmsg[i].msg_hdr;

        if (mh->msg_flags & MSG_TRUNC) {
            BUMP(p->c.malformed);
            continue;
        }
        seg = p->gro ? gro_size(mh) : 0;
        if (seg == 0 || seg >= len) {
            one_datagram(p, b, len, mh, now, &o);
            continue;
        }
        BUMP(p->c.gro_receives);
        for (size_t off = 0; off < len; off += seg)
            one_datagram(p, b + off, len - off < seg ? len - off : seg, mh, now, &o);
    }
    out_flush(p, &o);
}

/* Reads a batch of frames from one link's local end, seals them and sends
 * them to its peer.  Returns -1 when the local end is dead. */
static int local_in(lk_pump *p, lk_link *l, short revents, double now)
{
    int n = 0, out = 0, err = 0;

    if (l->is_sock) {
        for (int i = 0; i < p->batch; i++) {
            p->tiov[i].iov_base = p->tx + (size_t)i * LK_SLOT + LK_HEADER;
            p->tiov[i].iov_len = LK_READ_MAX;
            p->tmsg[i].msg_hdr = (struct msghdr){.msg_iov = &p->tiov[i], .msg_iovlen = 1};
        }
        n = recvmmsg(l->fd, p->tmsg, p->batch, MSG_DONTWAIT, NULL);
        if (n < 0) {
            err = errno;
            n = 0;
        }
    } else {
        for (; n < p->batch; n++) {
            ssize_t r = read(l->fd, p->tx + (size_t)n * LK_SLOT + LK_HEADER, LK_READ_MAX);
            if (r < 0) {
                err = errno;
                break;
            }
            p->tmsg[n].msg_len = (unsigned)r;
            p->tmsg[n].msg_hdr.msg_flags = 0;
        }
    }
    if (n == 0 && err != EAGAIN && err != EINTR) {
        BUMP(l->local_errors);
        if (revents & (POLLERR | POLLHUP | POLLNVAL) || err == EBADF || err == EBADFD
            || err == EIO)
            return -1;
        return 0;
    }
    for (int i = 0; i < n; i++) {
        uint8_t *b = p->tx + (size_t)i * LK_SLOT;
        size_t len = p->tmsg[i].msg_len;
        long dlen;
        if ((p->tmsg[i].msg_hdr.msg_flags & MSG_TRUNC) || len < LK_MIN_FRAME
            || len > LK_MAX_FRAME) {
            BUMP(l->bad_frames);
            continue;
        }
        if (!l->peer_len) {
            BUMP(l->no_peer);
            continue;
        }
        if ((dlen = lk_seal(l->sealer, LK_TYPE_DATA, l->link_id, b, len)) < 0) {
            BUMP(l->exhausted);
            continue;
        }
        BUMP(l->frames_out);
        ADD(l->bytes_out, len);
        p->tiov[out++] = (struct iovec){b, (size_t)dlen};
    }
    if (out) {
        l->last_sent = now;
        send_all(p, l, out);
    }
    return 0;
}

int lk_pump_run(lk_pump *p)
{
    struct pollfd *pfd = NULL;
    lk_link **pl = NULL;
    size_t npfd = 0, cap = 0;
    unsigned gen;
    double next_ka = 0;
    int ret = 0;

    pthread_mutex_lock(&p->mu);
    if (p->running) {
        pthread_mutex_unlock(&p->mu);
        p->err_call = "lk_pump_run (already running)";
        return -EBUSY;
    }
    p->running = 1;
    gen = p->gen - 1;
    for (;;) {
        double now;
        int r, e, timeout = -1;
        if (gen != p->gen) {
            gen = p->gen;
            if (cap < p->n + 2) {
                cap = p->n + 2;
                free(pfd); free(pl);
                pfd = malloc(cap * sizeof *pfd);
                pl = malloc(cap * sizeof *pl);
                if (!pfd || !pl) {
                    ret = -ENOMEM;
                    p->err_call = "malloc";
                    break;
                }
            }
            pfd[0] = (struct pollfd){.fd = p->stop_fd, .events = POLLIN};
            pfd[1] = (struct pollfd){.fd = p->udp_fd, .events = POLLIN};
            npfd = 2;
            for (size_t i = 0; i < p->n; i++)
                if (!p->links[i]->dead) {
                    pl[npfd] = p->links[i];
                    pfd[npfd++] = (struct pollfd){.fd = p->links[i]->fd, .events = POLLIN};
                }
        }
        if (p->keepalive > 0) {
            double step = p->keepalive / 4 < 1 ? p->keepalive / 4 : 1;
            now = mono();
            if (now >= next_ka) {
                keepalives(p, now);
                next_ka = now + step;
            }
            timeout = (int)((next_ka - now) * 1000) + 1;
        }
        pthread_mutex_unlock(&p->mu);
        r = poll(pfd, npfd, timeout);
        e = errno;
        pthread_mutex_lock(&p->mu);
        if (r < 0) {
            ret = -e;
            p->err_call = "poll";
            break;
        }
        if (pfd[0].revents) {
            uint64_t v;
            if (read(p->stop_fd, &v, sizeof v) == sizeof v && v >= 1ULL << 32)
                break;                 /* stopped; add and remove only woke us */
            continue;
        }
        if (gen != p->gen)
            continue;                  /* the table changed while we polled */
        if (pfd[1].revents & POLLNVAL) {
            ret = -EBADF;
            p->err_call = "poll(UDP socket)";
            break;
        }
        BUMP(p->c.rounds);
        now = mono();
        if (pfd[1].revents)
            udp_in(p, now);
        for (size_t i = 2; i < npfd; i++)
            if (pfd[i].revents && local_in(p, pl[i], pfd[i].revents, now) < 0) {
                pl[i]->dead = 1;
                p->gen++;
            }
    }
    p->running = 0;
    pthread_mutex_unlock(&p->mu);
    free(pfd);
    free(pl);
    return ret;
}
