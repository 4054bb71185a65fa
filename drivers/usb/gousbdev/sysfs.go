package gousbdev

/*
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

// ephysd_read_attr reads up to n-1 bytes of a sysfs attribute into buf and
// NUL-terminates it; it returns the count or -1.
static int ephysd_read_attr(const char *path, char *buf, int n) {
	FILE *f = fopen(path, "r");
	if (f == NULL) return -1;
	size_t k = fread(buf, 1, (size_t)n - 1, f);
	fclose(f);
	buf[k] = 0;
	return (int)k;
}

// ephysd_list_dir writes the names in dir, each followed by '\n', into buf.
static int ephysd_list_dir(const char *dir, char *buf, int n) {
	DIR *d = opendir(dir);
	if (d == NULL) return -1;
	int used = 0;
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		int l = (int)strlen(e->d_name);
		if (e->d_name[0] == '.') continue;
		if (used + l + 2 > n) break;
		memcpy(buf + used, e->d_name, (size_t)l);
		used += l;
		buf[used++] = '\n';
	}
	closedir(d);
	buf[used] = 0;
	return used;
}

static int ephysd_access_rw(const char *path) {
	return access(path, R_OK | W_OK);
}
*/
import "C"

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"syscall"
	"unsafe"
)

// The sysfs and /dev look-ups go through libc, like libusb's own, so that
// the process sees the same tree as libusb does (under umockdev-run that
// is the mocked one; Go's raw system calls would bypass it).

const sysUSBDevices = "/sys/bus/usb/devices"

// sysfsStrings are the string descriptors the kernel caches in sysfs.
type sysfsStrings struct {
	serial, manufacturer, product string
}

func readAttr(path string) (string, bool) {
	cp := C.CString(path)
	defer C.free(unsafe.Pointer(cp))
	var buf [256]C.char
	n := C.ephysd_read_attr(cp, &buf[0], C.int(len(buf)))
	if n < 0 {
		return "", false
	}
	return strings.TrimSpace(C.GoStringN(&buf[0], n)), true
}

func listDir(dir string) []string {
	cp := C.CString(dir)
	defer C.free(unsafe.Pointer(cp))
	buf := make([]byte, 64<<10)
	n := C.ephysd_list_dir(cp, (*C.char)(unsafe.Pointer(&buf[0])), C.int(len(buf)))
	if n <= 0 {
		return nil
	}
	return strings.Fields(string(buf[:n]))
}

// sysfsByAddress maps "bus/address" to the device's cached strings.
func sysfsByAddress() map[string]sysfsStrings {
	out := map[string]sysfsStrings{}
	for _, name := range listDir(sysUSBDevices) {
		if strings.Contains(name, ":") { // an interface, not a device
			continue
		}
		dir := sysUSBDevices + "/" + name + "/"
		bus, ok1 := readAttr(dir + "busnum")
		dev, ok2 := readAttr(dir + "devnum")
		if !ok1 || !ok2 {
			continue
		}
		b, err1 := strconv.Atoi(bus)
		d, err2 := strconv.Atoi(dev)
		if err1 != nil || err2 != nil {
			continue
		}
		var s sysfsStrings
		s.serial, _ = readAttr(dir + "serial")
		s.manufacturer, _ = readAttr(dir + "manufacturer")
		s.product, _ = readAttr(dir + "product")
		out[addrKey(b, d)] = s
	}
	return out
}

func addrKey(bus, addr int) string { return strconv.Itoa(bus) + "/" + strconv.Itoa(addr) }

// devNode is the usbfs node of a device.
func devNode(bus, addr int) string { return fmt.Sprintf("/dev/bus/usb/%03d/%03d", bus, addr) }

// accessText is "" when this process may open the device node read-write,
// otherwise why not and what to do.
func accessText(bus, addr int) string {
	path := devNode(bus, addr)
	cp := C.CString(path)
	defer C.free(unsafe.Pointer(cp))
	r, err := C.ephysd_access_rw(cp)
	if r == 0 {
		return ""
	}
	var errno syscall.Errno
	if errors.As(err, &errno) && (errno == syscall.EACCES || errno == syscall.EPERM) {
		return path + ": permission denied — " + permissionRemedy
	}
	if err == nil {
		return path + ": not accessible"
	}
	return path + ": " + err.Error()
}

const permissionRemedy = "install systemd/99-ephysd.rules (udev rule giving the ephysd group access to the device) or run as a member of the group that owns the node"
