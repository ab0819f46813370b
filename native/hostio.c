/*
 * The few host I/O calls node's fs does not offer, built by
 * scripts/build-native.mjs when a C compiler and node's headers are there
 * (nothing is downloaded); src/block/hostio.ts loads it and every caller has a
 * fallback without it.
 *
 * seekData(fd, offset) / seekHole(fd, offset): lseek(2) with SEEK_DATA /
 * SEEK_HOLE, how rblock finds the holes of a sparse raw file (block status,
 * map, convert, the NBD server), as qemu's file driver does. They return the
 * resulting offset, -1 for ENXIO (no data at or after offset / offset at or
 * past the end), or -(2 + errno) for any other error (e.g. EINVAL: the file
 * system has no SEEK_DATA). Only positional I/O is used on these
 * descriptors elsewhere, so moving the file position does no harm.
 *
 * preadNowait(fd, buf, offset): preadv2(2) with RWF_NOWAIT, a read that is
 * served only from the page cache and never blocks: what the NBD server tries
 * first, on its own thread, before handing a read to node's thread pool (the
 * round trip through the pool cost more than a cached 4 KiB read itself).
 * Returns the bytes read (possibly fewer than asked: only the cached
 * prefix, 0 at the end of the file), -1 when nothing could be read without
 * blocking (EAGAIN), or -(2 + errno) for any other error (EOPNOTSUPP: the
 * kernel or file system has no RWF_NOWAIT).
 *
 * dupFd(fd): a close-on-exec duplicate of a descriptor (F_DUPFD_CLOEXEC), or
 * -(2 + errno). The NBD server re-opens each accepted socket through a
 * duplicate as a net.Socket with `onread`, node's documented way to read a
 * socket into one reused buffer (it exists for sockets made from an fd or by
 * connect(), not for accepted ones): a fresh 64 KiB buffer per socket read
 * was half the CPU of receiving write payloads, and drove the major GCs.
 *
 * setSendBuffer(fd, bytes): SO_SNDBUF, which node sets only on UDP sockets;
 * returns the size the kernel then reports (it doubles the request for its
 * bookkeeping and caps it at net.core.wmem_max), or -(2 + errno).
 *
 * cached(fd, offset, length): cachestat(2) (Linux 6.5): 1 when every page of
 * the range is in the page cache, 0 when not, or -(2 + errno) (ENOSYS on an
 * older kernel). The NBD server splices only cached ranges, so that its
 * event-loop thread never waits for the disk.
 *
 * pipeOpen(bytes): a non-blocking, close-on-exec pipe of about that capacity
 * (F_SETPIPE_SZ, capped by the kernel), as [readFd, writeFd, capacity], or a
 * number -(2 + errno).
 *
 * sendItems(sock, pipeR, pipeW, items): send items in order on a socket
 * without blocking (MSG_DONTWAIT) and without SIGPIPE (MSG_NOSIGNAL): a
 * Uint8Array is sent as bytes (consecutive ones in one sendmsg), an object
 * { fd, offset, length } as that range of a file, moved by splice(2)
 * through the pipe: file -> pipe takes references to the page
 * cache pages and pipe -> socket hands them to the socket, so the data is
 * never copied into a user buffer (for a Unix socket the reader copies
 * straight from the page cache). Returns [k, into, rest, err]: items before
 * k were sent whole, `into` bytes of item k were taken; `rest` is null or a
 * Buffer of bytes of item k that were read into the pipe but not taken by
 * the socket (they come before item k's remaining bytes); err is 0, or
 * -(2 + errno) for a failure other than a full socket. How the NBD server
 * hands a turn's replies to the kernel without node's stream machinery
 * (src/nbd/stream.ts, StreamWriter); the pipe is only used for spans.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <node_api.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

static napi_value number(napi_env env, double v) {
  napi_value out;
  napi_create_double(env, v, &out);
  return out;
}

static napi_value seek_with(napi_env env, napi_callback_info info, int whence) {
  size_t argc = 2;
  napi_value argv[2];
  int32_t fd = -1;
  int64_t offset = 0;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 ||
      napi_get_value_int32(env, argv[0], &fd) != napi_ok || napi_get_value_int64(env, argv[1], &offset) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected (fd, offset)");
    return NULL;
  }
  off_t r = lseek(fd, (off_t)offset, whence);
  return number(env, r >= 0 ? (double)r : errno == ENXIO ? -1.0 : -2.0 - (double)errno);
}

static napi_value seek_data(napi_env env, napi_callback_info info) { return seek_with(env, info, SEEK_DATA); }
static napi_value seek_hole(napi_env env, napi_callback_info info) { return seek_with(env, info, SEEK_HOLE); }

static napi_value pread_nowait(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  int32_t fd = -1;
  int64_t offset = 0;
  napi_typedarray_type type;
  size_t length = 0;
  void *data = NULL;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3 ||
      napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_typedarray_info(env, argv[1], &type, &length, &data, NULL, NULL) != napi_ok || type != napi_uint8_array ||
      napi_get_value_int64(env, argv[2], &offset) != napi_ok || offset < 0) {
    napi_throw_type_error(env, NULL, "expected (fd, Uint8Array, offset)");
    return NULL;
  }
  if (length == 0) return number(env, 0);
#ifdef RWF_NOWAIT
  struct iovec iov = {data, length};
  ssize_t r = preadv2(fd, &iov, 1, (off_t)offset, RWF_NOWAIT);
  return number(env, r >= 0 ? (double)r : errno == EAGAIN ? -1.0 : -2.0 - (double)errno);
#else
  return number(env, -2.0 - (double)EOPNOTSUPP);
#endif
}

static napi_value dup_fd(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t fd = -1;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 || napi_get_value_int32(env, argv[0], &fd) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected (fd)");
    return NULL;
  }
  int r = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  return number(env, r >= 0 ? (double)r : -2.0 - (double)errno);
}

static napi_value set_send_buffer(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  int32_t fd = -1, bytes = 0;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int32(env, argv[1], &bytes) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected (fd, bytes)");
    return NULL;
  }
  if (setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes) != 0) return number(env, -2.0 - (double)errno);
  int got = 0;
  socklen_t len = sizeof got;
  if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &got, &len) != 0) return number(env, -2.0 - (double)errno);
  return number(env, (double)got);
}

/* One non-blocking sendmsg of n buffers, without SIGPIPE, retried on EINTR. */
static ssize_t send_iov(int fd, struct iovec *iov, int n) {
  struct msghdr msg = {0};
  msg.msg_iov = iov;
  msg.msg_iovlen = n;
  ssize_t r;
  do r = sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
  while (r < 0 && errno == EINTR);
  return r;
}

#ifndef SYS_cachestat
#define SYS_cachestat 451
#endif

struct rb_cachestat_range {
  uint64_t off, len;
};
struct rb_cachestat {
  uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};

static napi_value cached(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  int32_t fd = -1;
  int64_t offset = 0, length = 0;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int64(env, argv[1], &offset) != napi_ok || napi_get_value_int64(env, argv[2], &length) != napi_ok || offset < 0 ||
      length < 0) {
    napi_throw_type_error(env, NULL, "expected (fd, offset, length)");
    return NULL;
  }
  if (length == 0) return number(env, 1);
  long ps = sysconf(_SC_PAGESIZE);
  uint64_t first = (uint64_t)offset / ps, last = ((uint64_t)offset + length + ps - 1) / ps;
  struct rb_cachestat_range r = {first * ps, (last - first) * ps};
  struct rb_cachestat cs = {0};
  if (syscall(SYS_cachestat, fd, &r, &cs, 0) != 0) return number(env, -2.0 - (double)errno);
  return number(env, cs.nr_cache >= last - first ? 1 : 0);
}

static napi_value pipe_open(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t bytes = 0;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 || napi_get_value_int32(env, argv[0], &bytes) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected (bytes)");
    return NULL;
  }
  int p[2];
  if (pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) return number(env, -2.0 - (double)errno);
  int cap = fcntl(p[1], F_SETPIPE_SZ, bytes);
  if (cap < 0) cap = fcntl(p[1], F_GETPIPE_SZ);
  if (cap <= 0) {
    int e = errno;
    close(p[0]);
    close(p[1]);
    return number(env, -2.0 - (double)e);
  }
  napi_value out;
  napi_create_array_with_length(env, 3, &out);
  napi_set_element(env, out, 0, number(env, p[0]));
  napi_set_element(env, out, 1, number(env, p[1]));
  napi_set_element(env, out, 2, number(env, cap));
  return out;
}

static napi_value items_result(napi_env env, uint32_t k, double into, napi_value rest, double err) {
  napi_value out, null_value;
  napi_get_null(env, &null_value);
  napi_create_array_with_length(env, 4, &out);
  napi_set_element(env, out, 0, number(env, k));
  napi_set_element(env, out, 1, number(env, into));
  napi_set_element(env, out, 2, rest != NULL ? rest : null_value);
  napi_set_element(env, out, 3, number(env, err));
  return out;
}

static int int_prop(napi_env env, napi_value obj, const char *name, int64_t *out) {
  napi_value v;
  return napi_get_named_property(env, obj, name, &v) == napi_ok && napi_get_value_int64(env, v, out) == napi_ok;
}

/* Whatever the pipe still holds (at most `n` bytes) into a new Buffer, so the pipe is empty again. */
static napi_value drain_pipe(napi_env env, int pipe_r, size_t n) {
  void *data = NULL;
  napi_value buf;
  if (napi_create_buffer(env, n, &data, &buf) != napi_ok) return NULL;
  size_t got = 0;
  while (got < n) {
    ssize_t r = read(pipe_r, (char *)data + got, n - got);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    got += (size_t)r;
  }
  if (got < n) {
    napi_value sub;
    /* Fewer than expected (cannot happen with a pipe only we use): hand back what there is. */
    if (napi_create_buffer_copy(env, got, data, NULL, &sub) == napi_ok) return sub;
  }
  return buf;
}

static napi_value send_items(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  int32_t sock = -1, pipe_r = -1, pipe_w = -1;
  uint32_t count = 0;
  bool is_array = false;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 4 || napi_get_value_int32(env, argv[0], &sock) != napi_ok ||
      napi_get_value_int32(env, argv[1], &pipe_r) != napi_ok || napi_get_value_int32(env, argv[2], &pipe_w) != napi_ok ||
      napi_is_array(env, argv[3], &is_array) != napi_ok || !is_array || napi_get_array_length(env, argv[3], &count) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected (sock, pipeR, pipeW, items)");
    return NULL;
  }
  uint32_t i = 0;
  while (i < count) {
    napi_value el;
    bool is_ta = false;
    if (napi_get_element(env, argv[3], i, &el) != napi_ok || napi_is_typedarray(env, el, &is_ta) != napi_ok) goto bad;
    if (is_ta) {
      /* A run of byte items: one sendmsg of up to 64 of them. */
      struct iovec iov[64];
      uint32_t first = i;
      int n = 0;
      size_t want = 0;
      for (; i < count && n < 64; i++) {
        napi_value e2;
        bool ta2 = false;
        napi_typedarray_type type;
        size_t length = 0;
        void *data = NULL;
        if (napi_get_element(env, argv[3], i, &e2) != napi_ok || napi_is_typedarray(env, e2, &ta2) != napi_ok) goto bad;
        if (!ta2) break;
        if (napi_get_typedarray_info(env, e2, &type, &length, &data, NULL, NULL) != napi_ok || type != napi_uint8_array) goto bad;
        iov[n].iov_base = data;
        iov[n].iov_len = length;
        want += length;
        n++;
      }
      if (want == 0) continue;
      ssize_t r = send_iov(sock, iov, n);
      if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) return items_result(env, first, 0, NULL, 0);
        return items_result(env, first, 0, NULL, -2.0 - (double)errno);
      }
      if ((size_t)r < want) {
        /* Which item the socket stopped in. */
        size_t left = (size_t)r;
        int j = 0;
        while (j < n && left >= iov[j].iov_len) left -= iov[j++].iov_len;
        return items_result(env, first + (uint32_t)j, (double)left, NULL, 0);
      }
      continue;
    }
    int64_t fd = -1, off = 0, len = 0;
    if (!int_prop(env, el, "fd", &fd) || !int_prop(env, el, "offset", &off) || !int_prop(env, el, "length", &len) || off < 0 || len < 0) goto bad;
    int64_t done = 0;
    while (done < len) {
      loff_t o = off + done;
      ssize_t in;
      do in = splice((int)fd, &o, pipe_w, NULL, (size_t)(len - done), SPLICE_F_MOVE);
      while (in < 0 && errno == EINTR);
      if (in <= 0) return items_result(env, i, (double)done, NULL, in == 0 ? -2.0 - (double)EIO : -2.0 - (double)errno);
      ssize_t out = 0;
      while (out < in) {
        ssize_t m;
        do m = splice(pipe_r, NULL, sock, NULL, (size_t)(in - out), SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        while (m < 0 && errno == EINTR);
        if (m <= 0) {
          int e = m < 0 ? errno : EIO;
          napi_value rest = drain_pipe(env, pipe_r, (size_t)(in - out));
          /* Without the bytes back the pipe is not empty: the stream cannot go on. */
          if (rest == NULL) return items_result(env, i, (double)(done + in), NULL, -2.0 - (double)ENOMEM);
          return items_result(env, i, (double)(done + in), rest, e == EAGAIN || e == EWOULDBLOCK ? 0 : -2.0 - (double)e);
        }
        out += m;
      }
      done += in;
    }
    i++;
  }
  return items_result(env, count, 0, NULL, 0);
bad:
  napi_throw_type_error(env, NULL, "expected (sock, pipeR, pipeW, items)");
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"seekData", NULL, seek_data, NULL, NULL, NULL, napi_default, NULL},
      {"seekHole", NULL, seek_hole, NULL, NULL, NULL, napi_default, NULL},
      {"preadNowait", NULL, pread_nowait, NULL, NULL, NULL, napi_default, NULL},
      {"dupFd", NULL, dup_fd, NULL, NULL, NULL, napi_default, NULL},
      {"setSendBuffer", NULL, set_send_buffer, NULL, NULL, NULL, napi_default, NULL},
      {"cached", NULL, cached, NULL, NULL, NULL, napi_default, NULL},
      {"pipeOpen", NULL, pipe_open, NULL, NULL, NULL, napi_default, NULL},
      {"sendItems", NULL, send_items, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, 8, props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
