/*
 * Copied from the project's shared recipe (shared/xenstored-host/xsdshim.c) so that the
 * tests build it from a fresh clone; keep the two in step.
 *
 * LD_PRELOAD shim letting Debian's real C xenstored (4.17) run on a host
 * without Xen.  Replaces the handful of libxenctrl / libxenevtchn /
 * libxengnttab entry points xenstored imports, plus open() of
 * /proc/xen/xsd_{port,kva}.
 *
 * Everything lives in $XSD_SHIM_DIR:
 *   ring-<domid>   4096-byte file = the xenstore ring page of <domid>
 *                  (ring-0 is created automatically; for a guest the test
 *                  harness creates it before XS_INTRODUCE).  Its existence
 *                  also makes xc_domain_getinfo() report the domain.
 *   dead-<domid>   if present, xc_domain_getinfo() reports shutdown.
 *   evtchn         FIFO; write a 4-byte port number to kick xenstored
 *                  (port 1 = VIRQ_DOM_EXC -> check_domains()).
 *   notify-<domid> optional FIFO; xenstored writes one byte per notify.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <xenctrl.h>
#include <xenevtchn.h>
#include <xengnttab.h>

#define VIRQ_PORT 1
#define PORT_BASE 1000 /* local port = PORT_BASE + domid */

static const char *dir(void)
{
	const char *d = getenv("XSD_SHIM_DIR");
	return d ? d : ".";
}

static void pathf(char *buf, size_t len, const char *name, int domid)
{
	if (domid >= 0)
		snprintf(buf, len, "%s/%s-%d", dir(), name, domid);
	else
		snprintf(buf, len, "%s/%s", dir(), name);
}

static int ensure_ring(int domid, int create)
{
	char p[4096];
	int fd;

	pathf(p, sizeof(p), "ring", domid);
	fd = (create ? open(p, O_RDWR | O_CREAT | O_CLOEXEC, 0600)
		     : open(p, O_RDWR | O_CLOEXEC));
	if (fd < 0)
		return -1;
	if (create && ftruncate(fd, 4096) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

/* ---- open() interposition for /proc/xen/xsd_port and xsd_kva ---- */
static int (*real_open)(const char *, int, ...);

int open(const char *path, int flags, ...)
{
	mode_t mode = 0;
	va_list ap;

	if (!real_open)
		real_open = dlsym(RTLD_NEXT, "open");
	if (flags & O_CREAT) {
		va_start(ap, flags);
		mode = va_arg(ap, int);
		va_end(ap);
	}
	if (path && !strcmp(path, "/proc/xen/xsd_port")) {
		char p[4096];
		int fd;

		pathf(p, sizeof(p), "xsd_port", -1);
		fd = real_open(p, O_RDWR | O_CREAT | O_TRUNC, 0600);
		if (fd >= 0) {
			if (write(fd, "7\n", 2) != 2 || lseek(fd, 0, SEEK_SET)) {
				close(fd);
				return -1;
			}
		}
		return fd;
	}
	if (path && !strcmp(path, "/proc/xen/xsd_kva"))
		return ensure_ring(0, 1);
	return real_open(path, flags, mode);
}

/* ---- libxenctrl ---- */
static int dummy_xc;

xc_interface *xc_interface_open(xentoollog_logger *l, xentoollog_logger *d,
				unsigned f)
{
	return (xc_interface *)&dummy_xc;
}

int xc_interface_close(xc_interface *xch) { return 0; }

int xc_domain_getinfo(xc_interface *xch, uint32_t first_domid,
		      unsigned int max_doms, xc_dominfo_t *info)
{
	char p[4096];

	if (max_doms < 1)
		return 0;
	pathf(p, sizeof(p), "ring", first_domid);
	if (first_domid != 0 && access(p, F_OK))
		return 0;
	memset(info, 0, sizeof(*info));
	info->domid = first_domid;
	info->running = 1;
	pathf(p, sizeof(p), "dead", first_domid);
	if (!access(p, F_OK)) {
		info->running = 0;
		info->shutdown = 1;
		info->dying = 1;
	}
	return 1;
}

/* ---- libxenevtchn ---- */
static int evfd = -1;
static int dummy_xce;

xenevtchn_handle *xenevtchn_open(xentoollog_logger *l, unsigned flags)
{
	char p[4096];

	pathf(p, sizeof(p), "evtchn", -1);
	unlink(p);
	if (mkfifo(p, 0600) < 0)
		return NULL;
	evfd = real_open ? real_open(p, O_RDWR | O_NONBLOCK | O_CLOEXEC)
			 : (open)(p, O_RDWR | O_NONBLOCK | O_CLOEXEC);
	return evfd < 0 ? NULL : (xenevtchn_handle *)&dummy_xce;
}

xenevtchn_handle *xenevtchn_fdopen(xentoollog_logger *l, int fd,
				   unsigned flags)
{
	evfd = fd;
	return (xenevtchn_handle *)&dummy_xce;
}

int xenevtchn_close(xenevtchn_handle *x) { return 0; }
int xenevtchn_fd(xenevtchn_handle *x) { return evfd; }

xenevtchn_port_or_error_t xenevtchn_bind_virq(xenevtchn_handle *x,
					      unsigned int virq)
{
	return VIRQ_PORT;
}

xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *x,
						     uint32_t domid,
						     evtchn_port_t rport)
{
	return PORT_BASE + domid;
}

int xenevtchn_unbind(xenevtchn_handle *x, evtchn_port_t port) { return 0; }
int xenevtchn_unmask(xenevtchn_handle *x, evtchn_port_t port) { return 0; }

xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *x)
{
	uint32_t port;
	ssize_t r = read(evfd, &port, sizeof(port));

	if (r == sizeof(port))
		return port;
	if (r < 0 && errno == EAGAIN)
		return PORT_BASE + 0x7fff; /* spurious: harmless */
	return -1;
}

int xenevtchn_notify(xenevtchn_handle *x, evtchn_port_t port)
{
	char p[4096];
	int fd;

	if (port < PORT_BASE)
		return 0;
	pathf(p, sizeof(p), "notify", port - PORT_BASE);
	fd = real_open ? real_open(p, O_WRONLY | O_NONBLOCK | O_CLOEXEC)
		       : (open)(p, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
	if (fd >= 0) {
		if (write(fd, "!", 1) < 0) {
			/* reader slow or gone: ignore, it polls the ring */
		}
		close(fd);
	}
	return 0;
}

/* ---- libxengnttab ---- */
static int dummy_xgt;

xengnttab_handle *xengnttab_open(xentoollog_logger *l, unsigned flags)
{
	return (xengnttab_handle *)&dummy_xgt;
}

int xengnttab_close(xengnttab_handle *x) { return 0; }
int xengnttab_set_max_grants(xengnttab_handle *x, uint32_t n) { return 0; }

void *xengnttab_map_grant_ref(xengnttab_handle *x, uint32_t domid,
			      uint32_t ref, int prot)
{
	int fd = ensure_ring(domid, 0);
	void *p;

	if (fd < 0)
		return NULL;
	p = mmap(NULL, 4096, prot, MAP_SHARED, fd, 0);
	close(fd);
	return p == MAP_FAILED ? NULL : p;
}

int xengnttab_unmap(xengnttab_handle *x, void *start_address,
		    uint32_t count)
{
	return munmap(start_address, 4096UL * count);
}

/* ---- extras for oxenstored ---- */
#include <sys/resource.h>
/* oxenstored raises RLIMIT_NOFILE to nr_open; clamp to the hard limit
 * when we lack CAP_SYS_RESOURCE. */
int setrlimit(__rlimit_resource_t res, const struct rlimit *rl)
{
	static int (*real)(__rlimit_resource_t, const struct rlimit *);
	struct rlimit cur, r = *rl;

	if (!real)
		real = dlsym(RTLD_NEXT, "setrlimit");
	if (real(res, rl) == 0)
		return 0;
	if (errno == EPERM && getrlimit(res, &cur) == 0) {
		if (r.rlim_max > cur.rlim_max)
			r.rlim_max = cur.rlim_max;
		if (r.rlim_cur > r.rlim_max)
			r.rlim_cur = r.rlim_max;
		return real(res, &r);
	}
	return -1;
}

/* oxenstored maps a guest's ring by mfn via foreign memory. */
void *xc_map_foreign_range(xc_interface *xch, uint32_t dom, int size,
			   int prot, unsigned long mfn)
{
	return xengnttab_map_grant_ref(NULL, dom, 0, prot);
}
