package serialport

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers/serialport/ptytest"
	"golang.org/x/sys/unix"
)

func TestOpenPTYBothWays(t *testing.T) {
	p := ptytest.New(t)
	port, lat, err := Open(p.Path, Options{Baud: 115200})
	if err != nil {
		t.Fatal(err)
	}
	defer port.Close()
	p.ReleaseSlave()
	if lat.TimerMS != 0 || lat.Hint != "" {
		t.Fatalf("a pty has no FTDI latency timer: %+v", lat)
	}
	if _, err := port.Write([]byte("v")); err != nil {
		t.Fatal(err)
	}
	if got := p.ReadFull(t, 1, 2*time.Second); string(got) != "v" {
		t.Fatalf("device got %q", got)
	}
	p.Master.Write([]byte{0xA0, 0x00, 0xC0, '\n', '\r'}) // raw: no translation
	buf := make([]byte, 5)
	port.SetReadTimeout(2 * time.Second)
	n := 0
	for n < 5 {
		k, err := port.Read(buf[n:])
		if err != nil || k == 0 {
			t.Fatalf("read: %d %v", k, err)
		}
		n += k
	}
	if string(buf) != "\xA0\x00\xC0\n\r" {
		t.Fatalf("got % x", buf)
	}
	// Unplug while the fake device is blocked reading: the read ends.
	done := make(chan error, 1)
	go func() {
		_, err := p.Master.Read(make([]byte, 1))
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	p.Unplug()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("Unplug did not end a pending read of the master")
	}
	port.SetReadTimeout(2 * time.Second)
	if _, err := port.Read(buf); err == nil {
		t.Fatal("read after unplug succeeded")
	}
}

func TestOpenErrorsSayWhatToDo(t *testing.T) {
	_, _, err := Open("/dev/ttyNOPE0", Options{})
	if err == nil || !strings.Contains(err.Error(), "/dev/ttyNOPE0: no such device") || !strings.Contains(err.Error(), "ephysd devices") {
		t.Fatalf("missing: %v", err)
	}
	// A file that is not a serial port.
	f, _ := os.CreateTemp(t.TempDir(), "notatty")
	f.Close()
	if _, _, err := Open(f.Name(), Options{}); err == nil || !strings.Contains(err.Error(), f.Name()) {
		t.Fatalf("not a tty: %v", err)
	}
}

func TestBusyNamesTheHolder(t *testing.T) {
	p := ptytest.New(t)
	// Holders skips this process itself; another program holding the port
	// is what a user meets (a terminal program, ModemManager).
	if h := Holders(p.Path); len(h) != 0 {
		t.Fatalf("holders of a pty only we hold: %v", h)
	}
	cmd := exec.Command("/bin/sh", "-c", "exec sleep 30 <>"+p.Path)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	deadline := time.Now().Add(5 * time.Second)
	for len(Holders(p.Path)) == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	_, _, err := Open(p.Path, Options{})
	want := fmt.Sprintf("PID %d (sleep)", cmd.Process.Pid)
	if err == nil || !strings.Contains(err.Error(), "busy") || !strings.Contains(err.Error(), want) {
		t.Fatalf("got %v, want busy and %q", err, want)
	}
}

// A child process started after the port was opened must not inherit it.
func TestPortIsCloseOnExec(t *testing.T) {
	p := ptytest.New(t)
	port, _, err := Open(p.Path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer port.Close()
	p.ReleaseSlave()
	out, err := exec.Command("/bin/sh", "-c", "ls -l /proc/$$/fd").CombinedOutput()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), p.Path) {
		t.Fatalf("a child inherited %s:\n%s", p.Path, out)
	}
}

// The closed-loop preset reads every sample on the Python thread: a Read,
// with data waiting or after waiting for it, must not allocate.
func TestReadAllocatesNothing(t *testing.T) {
	p := ptytest.New(t)
	port, _, err := Open(p.Path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer port.Close()
	p.ReleaseSlave()
	buf := make([]byte, 64)
	frame := []byte("0123456789")
	port.SetReadTimeout(2 * time.Second)
	withData := testing.AllocsPerRun(200, func() {
		p.Master.Write(frame)
		for n := 0; n < len(frame); {
			k, err := port.Read(buf)
			if err != nil || k == 0 {
				t.Fatalf("read: %d %v", k, err)
			}
			n += k
		}
	})
	port.SetReadTimeout(200 * time.Microsecond)
	waiting := testing.AllocsPerRun(200, func() {
		if k, err := port.Read(buf); k != 0 || err != nil {
			t.Fatalf("read with nothing sent: %d %v", k, err)
		}
	})
	// p.Master.Write is the test's (os.File) side; measure it alone.
	master := testing.AllocsPerRun(200, func() {
		p.Master.Write(frame)
	})
	port.SetReadTimeout(100 * time.Millisecond)
	for {
		if k, _ := port.Read(buf); k == 0 {
			break
		}
	}
	if withData-master > 0 || waiting > 0 {
		t.Fatalf("allocations per Read: %v with data (the master's write: %v), %v after a wait", withData, master, waiting)
	}
}

func TestCloseEndsPendingReadAndWrite(t *testing.T) {
	p := ptytest.New(t)
	port, _, err := Open(p.Path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	p.ReleaseSlave()
	port.SetReadTimeout(NoTimeout)
	readDone := make(chan error, 1)
	go func() {
		_, err := port.Read(make([]byte, 16))
		readDone <- err
	}()
	// Nobody reads the master: a big write fills the pty and waits.
	writeDone := make(chan error, 1)
	go func() {
		_, err := port.Write(make([]byte, 1<<20))
		writeDone <- err
	}()
	time.Sleep(50 * time.Millisecond)
	select {
	case err := <-readDone:
		t.Fatalf("read returned before Close: %v", err)
	case err := <-writeDone:
		t.Fatalf("1 MiB write into a pty nobody reads returned before Close: %v", err)
	default:
	}
	closed := make(chan error, 1)
	go func() { closed <- port.Close() }()
	for name, ch := range map[string]chan error{"read": readDone, "write": writeDone} {
		select {
		case err := <-ch:
			if !errors.Is(err, os.ErrClosed) {
				t.Fatalf("pending %s ended with %v, want os.ErrClosed", name, err)
			}
		case <-time.After(2 * time.Second):
			t.Fatalf("Close did not end the pending %s", name)
		}
	}
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	if err := port.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := port.Read(make([]byte, 1)); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("read after Close: %v", err)
	}
}

func TestHangupEndsReadWithErrHangup(t *testing.T) {
	p := ptytest.New(t)
	port, _, err := Open(p.Path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer port.Close()
	p.ReleaseSlave()
	port.SetReadTimeout(NoTimeout)
	done := make(chan error, 1)
	go func() {
		_, err := port.Read(make([]byte, 16))
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	p.Unplug()
	select {
	case err := <-done:
		if !errors.Is(err, ErrHangup) || !strings.Contains(err.Error(), p.Path) {
			t.Fatalf("read after hang-up: %v, want ErrHangup naming %s", err, p.Path)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("a hang-up did not end a blocked read")
	}
}

func TestBaudRates(t *testing.T) {
	for _, baud := range []int{57600, 115200, 250000, 2000000} {
		p := ptytest.New(t)
		pt, _, err := Open(p.Path, Options{Baud: baud})
		if err != nil {
			t.Fatalf("%d baud: %v", baud, err)
		}
		tio, err := unix.IoctlGetTermios(pt.(*port).fd, unix.TCGETS2)
		if err != nil {
			t.Fatal(err)
		}
		if tio.Ospeed != uint32(baud) || tio.Cflag&unix.CSIZE != unix.CS8 || tio.Cflag&(unix.PARENB|unix.CSTOPB|unix.CRTSCTS) != 0 || tio.Lflag&unix.ICANON != 0 {
			t.Fatalf("%d baud: termios %+v", baud, tio)
		}
		pt.Close()
	}
	p := ptytest.New(t)
	if _, _, err := Open(p.Path, Options{Baud: -5}); err == nil || !strings.Contains(err.Error(), "baud") {
		t.Fatalf("negative baud: %v", err)
	}
}
