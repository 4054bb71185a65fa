package serialport

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers/serialport/ptytest"
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
