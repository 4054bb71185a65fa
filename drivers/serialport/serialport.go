// Package serialport opens serial devices (USB CDC-ACM, FTDI and other
// USB-serial adapters) for the drivers: raw 8N1 at a chosen rate through
// termios (port_linux.go: reads that allocate nothing and cost one
// syscall while data waits), the kernel's low-latency flag where it can be
// set, and errors that say what to do. go.bug.st/serial's enumerator
// lists the ports (list.go).
package serialport

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Port is an open serial device.
type Port interface {
	io.ReadWriteCloser
	// SetReadTimeout makes Read return (0, nil) after d without data;
	// NoTimeout (-1) blocks.
	SetReadTimeout(d time.Duration) error
	// ResetInputBuffer drops what the kernel has buffered.
	ResetInputBuffer() error
}

// Options tune Open.
type Options struct {
	// Baud is the line rate (ignored by CDC-ACM devices, used by FTDI and
	// real UARTs). Default 115200.
	Baud int
	// NoLowLatency skips setting the low-latency flag.
	NoLowLatency bool
}

// Latency reports what Open could do about the FTDI latency timer.
type Latency struct {
	LowLatencyFlag bool   // ASYNC_LOW_LATENCY is set on the port
	TimerMS        int    // the FTDI latency timer from sysfs; 0 when not an FTDI port
	Hint           string // what the user should do, if anything
}

// Open opens path as a raw 8N1 serial port. Errors name the device and the
// remedy: permission (group dialout, the udev rule), busy (which process
// holds it), missing (is it plugged in).
func Open(path string, opt Options) (Port, Latency, error) {
	if opt.Baud == 0 {
		opt.Baud = 115200
	}
	var lat Latency
	if !opt.NoLowLatency {
		lat = setLowLatency(path)
	}
	if holders := Holders(path); len(holders) > 0 {
		return nil, lat, fmt.Errorf("serial %s: busy — it is open in %s; close that program (or stop the service) and try again", path, strings.Join(holders, ", "))
	}
	p, err := openPort(path, opt.Baud)
	if err != nil {
		return nil, lat, OpenError(path, err)
	}
	return p, lat, nil
}

// OpenError turns an open failure into an error that says what to do.
func OpenError(path string, err error) error {
	switch {
	case errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("serial %s: permission denied — add the service user to group %s (usermod -aG %s USER, then log in again) or install systemd/99-ephysd.rules", path, groupOf(path), groupOf(path))
	case errors.Is(err, unix.EBUSY):
		return fmt.Errorf("serial %s: busy — another program holds it%s", path, holdersText(path))
	case errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENXIO):
		return fmt.Errorf("serial %s: no such device — is it plugged in? `ephysd devices` lists the serial ports it sees", path)
	case errors.Is(err, errNotSerial):
		return fmt.Errorf("serial %s: %v", path, err)
	}
	return fmt.Errorf("serial %s: %w", path, err)
}

func holdersText(path string) string {
	if h := Holders(path); len(h) > 0 {
		return ": " + strings.Join(h, ", ")
	}
	return ""
}

func groupOf(path string) string {
	var st unix.Stat_t
	if unix.Stat(path, &st) == nil {
		if name := groupName(st.Gid); name != "" {
			return name
		}
	}
	return "dialout"
}

func groupName(gid uint32) string {
	data, err := os.ReadFile("/etc/group")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Split(line, ":")
		if len(f) >= 3 && f[2] == strconv.Itoa(int(gid)) {
			return f[0]
		}
	}
	return ""
}

// Holders lists the other processes that have path open, as "PID 123
// (screen)". It sees only processes the caller may inspect.
func Holders(path string) []string {
	target, err := filepath.EvalSymlinks(path)
	if err != nil {
		return nil
	}
	self := os.Getpid()
	procs, _ := os.ReadDir("/proc")
	var out []string
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil || pid == self {
			continue
		}
		fds, err := os.ReadDir(filepath.Join("/proc", p.Name(), "fd"))
		if err != nil {
			continue
		}
		for _, fd := range fds {
			if l, err := os.Readlink(filepath.Join("/proc", p.Name(), "fd", fd.Name())); err == nil && l == target {
				comm, _ := os.ReadFile(filepath.Join("/proc", p.Name(), "comm"))
				out = append(out, fmt.Sprintf("PID %d (%s)", pid, strings.TrimSpace(string(comm))))
				break
			}
		}
	}
	return out
}

// asyncLowLatency is ASYNC_LOW_LATENCY in struct serial_struct's flags.
const asyncLowLatency = 0x2000

// serialStruct is struct serial_struct (72 bytes on 64-bit Linux; flags at
// offset 16).
type serialStruct [72]byte

// setLowLatency sets the low-latency flag (which makes ftdi_sio use a 1 ms
// latency timer) and reports the FTDI latency timer. It never fails: on a
// device without the ioctl (a pty, CDC-ACM) there is nothing to do.
func setLowLatency(path string) Latency {
	var lat Latency
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_NOCTTY|unix.O_NONBLOCK, 0)
	if err == nil {
		var ss serialStruct
		if ioctl(fd, unix.TIOCGSERIAL, unsafe.Pointer(&ss)) == nil {
			flags := *(*int32)(unsafe.Pointer(&ss[16]))
			if flags&asyncLowLatency != 0 {
				lat.LowLatencyFlag = true
			} else {
				*(*int32)(unsafe.Pointer(&ss[16])) = flags | asyncLowLatency
				lat.LowLatencyFlag = ioctl(fd, unix.TIOCSSERIAL, unsafe.Pointer(&ss)) == nil
			}
		}
		unix.Close(fd)
	}
	lat.TimerMS = latencyTimer(path)
	if lat.TimerMS > 1 {
		lat.Hint = fmt.Sprintf("serial %s: the FTDI latency timer is %d ms, so samples arrive in %d ms bursts — install systemd/99-ephysd.rules (sets it to 1 ms) or run ephysd with permission to set the low-latency flag", path, lat.TimerMS, lat.TimerMS)
	}
	return lat
}

func ioctl(fd int, req uint, arg unsafe.Pointer) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(arg))
	if e != 0 {
		return e
	}
	return nil
}

// latencyTimer reads /sys/bus/usb-serial/devices/<tty>/latency_timer (FTDI
// only); 0 when there is none.
func latencyTimer(path string) int {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return 0
	}
	data, err := os.ReadFile(filepath.Join("/sys/bus/usb-serial/devices", filepath.Base(real), "latency_timer"))
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(data)))
	return n
}
