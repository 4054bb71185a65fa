// Package ptytest gives driver tests a real pseudo-terminal: the driver
// opens the slave by path through serialport, exactly as it opens a
// device, and the test's fake device speaks the protocol on the master.
package ptytest

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"
	"golang.org/x/term"
)

// PTY is a pseudo-terminal pair. Master is the fake device's end; Path is
// the path the driver opens: the slave's, or the link made by NewAt.
type PTY struct {
	Master *os.File
	Path   string
	// Slave is the slave's own path (/dev/pts/N), also when Path is a link.
	Slave  string
	link   string
	slave  *os.File
	closed atomic.Bool
}

// New opens a pseudo-terminal in raw mode. The slave stays open (so the
// master never sees EIO before the driver opens it) until Close or
// ReleaseSlave; Close on the master is the test's "unplug".
func New(t testing.TB) *PTY {
	t.Helper()
	m, s, err := pty.Open()
	if err != nil {
		t.Fatalf("ptytest: %v", err)
	}
	if _, err := term.MakeRaw(int(s.Fd())); err != nil {
		t.Fatalf("ptytest: raw mode: %v", err)
	}
	// A non-blocking master goes through Go's poller: deadlines work, and
	// Close (Unplug) ends a read that another goroutine has pending.
	fd, err := unix.Dup(int(m.Fd()))
	if err == nil {
		err = unix.SetNonblock(fd, true)
	}
	if err != nil {
		t.Fatalf("ptytest: %v", err)
	}
	m.Close()
	m = os.NewFile(uintptr(fd), "/dev/ptmx")
	p := &PTY{Master: m, Path: s.Name(), Slave: s.Name(), slave: s}
	t.Cleanup(p.Close)
	return p
}

// NewAt is New with the slave reached through a symbolic link at link, as
// udev makes /dev/serial/by-id/… for a USB serial device: the driver opens
// the link, and a new PTY made at the same link after an Unplug is the
// same device plugged in again (link is replaced atomically; its folder is
// created if missing). Unplug removes the link if it still points at this
// PTY, as udev does when the device goes away. Path is link.
func NewAt(t testing.TB, link string) *PTY {
	t.Helper()
	p := New(t)
	if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
		t.Fatalf("ptytest: %v", err)
	}
	tmp := link + ".new"
	os.Remove(tmp)
	if err := os.Symlink(p.Slave, tmp); err != nil {
		t.Fatalf("ptytest: %v", err)
	}
	if err := os.Rename(tmp, link); err != nil {
		t.Fatalf("ptytest: %v", err)
	}
	p.Path, p.link = link, link
	return p
}

// ReleaseSlave closes the test's own handle on the slave, once the driver
// has opened it, so that the driver's close is the last one.
func (p *PTY) ReleaseSlave() {
	if p.slave != nil {
		p.slave.Close()
		p.slave = nil
	}
}

// Unplug closes the master: the driver's reads fail as when a USB device
// is pulled out. A link made by NewAt is removed first, if it still points
// at this PTY. Later calls do nothing (the pseudo-terminal's number, and
// so the link's target, may have gone to a new PTY by then).
func (p *PTY) Unplug() {
	if p.closed.Swap(true) {
		return
	}
	if p.link != "" {
		if target, err := os.Readlink(p.link); err == nil && target == p.Slave {
			os.Remove(p.link)
		}
	}
	p.Master.Close()
}

// Close closes both ends.
func (p *PTY) Close() {
	p.ReleaseSlave()
	p.Unplug()
}

// Conn is the master as an io.ReadWriteCloser for a fake device that takes
// one: Read is p.Read, Write writes to the master, Close is p.Close.
func (p *PTY) Conn() io.ReadWriteCloser { return conn{p} }

type conn struct{ p *PTY }

func (c conn) Read(b []byte) (int, error)  { return c.p.Read(b) }
func (c conn) Write(b []byte) (int, error) { return c.p.Master.Write(b) }
func (c conn) Close() error                { c.p.Close(); return nil }

// Read reads what the driver wrote, like Master.Read, but while nobody has
// the slave open (before the driver opens it, between a driver's close and
// its reopening) it waits instead of failing with EIO. It fails once the
// master is closed.
func (p *PTY) Read(b []byte) (int, error) {
	for {
		n, err := p.Master.Read(b)
		if err != nil && errors.Is(err, syscall.EIO) && !p.closed.Load() {
			time.Sleep(2 * time.Millisecond)
			continue
		}
		return n, err
	}
}

// ReadFull reads exactly n bytes from the master (what the driver sent), or
// fails the test after timeout.
func (p *PTY) ReadFull(t testing.TB, n int, timeout time.Duration) []byte {
	t.Helper()
	buf := make([]byte, n)
	got := 0
	deadline := time.Now().Add(timeout)
	for got < n {
		p.Master.SetReadDeadline(deadline)
		k, err := p.Master.Read(buf[got:])
		got += k
		if err != nil {
			t.Fatalf("ptytest: read %d of %d bytes from the driver: %v (got % x)", got, n, err, buf[:got])
		}
	}
	return buf
}
