package serialport

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// NoTimeout, given to SetReadTimeout, makes Read block until data comes.
const NoTimeout time.Duration = -1

// ErrHangup is what Read returns once the device has hung up (unplugged,
// or a pty whose master was closed).
var ErrHangup = errors.New("the device hung up")

// port is a serial device opened with termios directly. Its Read is what a
// closed loop reads every sample through (on the Python thread in the
// closed-loop preset), so it allocates nothing and, while data is waiting,
// costs one read(2): the descriptor is non-blocking, and ppoll(2) waits
// only when nothing is there. An eventfd in every wait lets Close end a
// pending Read or Write at once.
type port struct {
	fd, wake int
	path     string

	// rw is held for reading by Read and Write, and for writing by Close
	// before it closes the descriptors, so none is closed under a call.
	rw      sync.RWMutex
	closed  atomic.Bool
	timeout atomic.Int64 // read timeout in ns; < 0: none

	errClosed error
	rpoll     [2]unix.PollFd // Read's: fd for POLLIN, wake
	wpoll     [2]unix.PollFd // Write's: fd for POLLOUT, wake
	rts       unix.Timespec
}

// standardBauds are the rates termios names (Bxxx); others are set with
// BOTHER, which the kernel's USB-serial drivers and ptys also accept.
var standardBauds = map[int]uint32{
	50: unix.B50, 75: unix.B75, 110: unix.B110, 134: unix.B134, 150: unix.B150,
	200: unix.B200, 300: unix.B300, 600: unix.B600, 1200: unix.B1200,
	1800: unix.B1800, 2400: unix.B2400, 4800: unix.B4800, 9600: unix.B9600,
	19200: unix.B19200, 38400: unix.B38400, 57600: unix.B57600,
	115200: unix.B115200, 230400: unix.B230400, 460800: unix.B460800,
	500000: unix.B500000, 576000: unix.B576000, 921600: unix.B921600,
	1000000: unix.B1000000, 1152000: unix.B1152000, 1500000: unix.B1500000,
	2000000: unix.B2000000, 2500000: unix.B2500000, 3000000: unix.B3000000,
	3500000: unix.B3500000, 4000000: unix.B4000000,
}

// errNotSerial marks a path that opened but is not a terminal device.
var errNotSerial = errors.New("not a serial port")

// openPort opens path raw 8N1 at baud, no flow control, close-on-exec, and
// exclusive (TIOCEXCL: a second open by another program fails with EBUSY).
func openPort(path string, baud int) (*port, error) {
	if baud <= 0 {
		return nil, fmt.Errorf("baud rate %d: must be > 0", baud)
	}
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_NOCTTY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*port, error) {
		unix.Close(fd)
		return nil, err
	}
	t, err := unix.IoctlGetTermios(fd, unix.TCGETS2)
	if err != nil {
		return fail(fmt.Errorf("%w (%v)", errNotSerial, err))
	}
	makeRaw(t)
	t.Cflag &^= unix.CBAUD
	if b, ok := standardBauds[baud]; ok {
		t.Cflag |= b
	} else {
		t.Cflag |= unix.BOTHER
	}
	t.Ispeed, t.Ospeed = uint32(baud), uint32(baud)
	if err := unix.IoctlSetTermios(fd, unix.TCSETS2, t); err != nil {
		return fail(fmt.Errorf("%w: setting raw mode at %d baud: %v", errNotSerial, baud, err))
	}
	if err := unix.IoctlSetInt(fd, unix.TIOCEXCL, 0); err != nil {
		return fail(fmt.Errorf("%w: TIOCEXCL: %v", errNotSerial, err))
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return fail(fmt.Errorf("eventfd: %w", err))
	}
	p := &port{fd: fd, wake: wake, path: path, errClosed: fmt.Errorf("serial %s: %w", path, os.ErrClosed)}
	p.timeout.Store(int64(NoTimeout))
	p.rpoll = [2]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}, {Fd: int32(wake), Events: unix.POLLIN}}
	p.wpoll = [2]unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}, {Fd: int32(wake), Events: unix.POLLIN}}
	return p, nil
}

// makeRaw is cfmakeraw(3) with 8N1, the receiver on, modem lines ignored,
// no flow control of either kind, and reads that return what is there.
func makeRaw(t *unix.Termios) {
	t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR |
		unix.ICRNL | unix.IXON | unix.IXOFF | unix.IXANY | unix.INPCK | unix.IGNPAR | unix.IUCLC
	t.Oflag &^= unix.OPOST
	t.Lflag &^= unix.ECHO | unix.ECHOE | unix.ECHOK | unix.ECHONL | unix.ECHOCTL | unix.ECHOPRT |
		unix.ECHOKE | unix.ICANON | unix.ISIG | unix.IEXTEN
	t.Cflag &^= unix.CSIZE | unix.PARENB | unix.PARODD | unix.CMSPAR | unix.CSTOPB | unix.CRTSCTS
	t.Cflag |= unix.CS8 | unix.CREAD | unix.CLOCAL
	t.Cc[unix.VMIN] = 1
	t.Cc[unix.VTIME] = 0
}

// SetReadTimeout makes Read return (0, nil) after d without data;
// NoTimeout blocks, 0 only takes what is already there.
func (p *port) SetReadTimeout(d time.Duration) error {
	if d < 0 && d != NoTimeout {
		return fmt.Errorf("serial %s: read timeout %v: must be ≥ 0 or NoTimeout", p.path, d)
	}
	p.timeout.Store(int64(d))
	return nil
}

// Read reads what the device has sent, at most len(p) bytes, waiting for
// the first byte up to the read timeout. Only one goroutine may read at a
// time. It allocates nothing.
func (p *port) Read(b []byte) (int, error) {
	p.rw.RLock()
	defer p.rw.RUnlock()
	if p.closed.Load() {
		return 0, p.errClosed
	}
	if len(b) == 0 {
		return 0, nil
	}
	timeout := time.Duration(p.timeout.Load())
	var deadline time.Time
	if timeout > 0 {
		deadline = time.Now().Add(timeout)
	}
	for {
		n, err := unix.Read(p.fd, b)
		switch {
		case n > 0:
			return n, nil
		case err == nil:
			// A tty reads 0 bytes only once it has hung up.
			return 0, fmt.Errorf("serial %s: %w", p.path, ErrHangup)
		case err == unix.EINTR:
			continue
		case err != unix.EAGAIN:
			if err == unix.EIO {
				return 0, fmt.Errorf("serial %s: %w (%v)", p.path, ErrHangup, err)
			}
			return 0, fmt.Errorf("serial %s: %w", p.path, err)
		}
		var ts *unix.Timespec
		if timeout >= 0 {
			left := time.Until(deadline)
			if timeout == 0 || left <= 0 {
				return 0, nil
			}
			p.rts = unix.NsecToTimespec(int64(left))
			ts = &p.rts
		}
		p.rpoll[0].Revents, p.rpoll[1].Revents = 0, 0
		if _, err := unix.Ppoll(p.rpoll[:], ts, nil); err != nil && err != unix.EINTR {
			return 0, fmt.Errorf("serial %s: poll: %w", p.path, err)
		}
		if p.rpoll[1].Revents != 0 || p.closed.Load() {
			return 0, p.errClosed
		}
		// Data, a hang-up or an error: the next read says which.
	}
}

// Write writes all of b, waiting while the device's output buffer is full
// (a Close ends the wait).
func (p *port) Write(b []byte) (int, error) {
	p.rw.RLock()
	defer p.rw.RUnlock()
	done := 0
	for done < len(b) {
		if p.closed.Load() {
			return done, p.errClosed
		}
		n, err := unix.Write(p.fd, b[done:])
		if n > 0 {
			done += n
		}
		switch {
		case err == nil || err == unix.EINTR:
			continue
		case err != unix.EAGAIN:
			if err == unix.EIO {
				return done, fmt.Errorf("serial %s: %w (%v)", p.path, ErrHangup, err)
			}
			return done, fmt.Errorf("serial %s: %w", p.path, err)
		}
		p.wpoll[0].Revents, p.wpoll[1].Revents = 0, 0
		if _, err := unix.Ppoll(p.wpoll[:], nil, nil); err != nil && err != unix.EINTR {
			return done, fmt.Errorf("serial %s: poll: %w", p.path, err)
		}
		if p.wpoll[1].Revents != 0 {
			return done, p.errClosed
		}
	}
	return done, nil
}

// ResetInputBuffer drops what the kernel has buffered from the device.
func (p *port) ResetInputBuffer() error {
	p.rw.RLock()
	defer p.rw.RUnlock()
	if p.closed.Load() {
		return p.errClosed
	}
	return unix.IoctlSetInt(p.fd, unix.TCFLSH, unix.TCIFLUSH)
}

// Close ends pending reads and writes, then closes the device. Closing
// twice is fine.
func (p *port) Close() error {
	if p.closed.Swap(true) {
		return nil
	}
	one := [8]byte{1}
	unix.Write(p.wake, one[:])
	p.rw.Lock()
	defer p.rw.Unlock()
	unix.IoctlSetInt(p.fd, unix.TIOCNXCL, 0)
	err := unix.Close(p.fd)
	unix.Close(p.wake)
	if err != nil {
		return fmt.Errorf("serial %s: close: %w", p.path, err)
	}
	return nil
}
