package daemon

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// notifyMsg is one datagram the daemon sent to NOTIFY_SOCKET.
type notifyMsg struct {
	at   time.Time
	text string
}

// TestRunUnderSystemdNotify runs the real binary as systemd would
// (Type=notify, WatchdogSec): READY=1 comes once the first block went
// through the pipeline, WATCHDOG=1 pings while blocks flow, stop while a
// Python stage blocks the pipeline (so systemd would restart the daemon),
// resume when it flows again, and SIGTERM gives STOPPING=1 and exit 0.
func TestRunUnderSystemdNotify(t *testing.T) {
	bin := buildBinary(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var mu sync.Mutex
	var msgs []notifyMsg
	go func() {
		buf := make([]byte, 4096)
		for {
			n, _, err := conn.ReadFromUnix(buf)
			if err != nil {
				return
			}
			mu.Lock()
			for _, line := range strings.Split(string(buf[:n]), "\n") {
				msgs = append(msgs, notifyMsg{time.Now(), line})
			}
			mu.Unlock()
		}
	}()
	// The stage sleeps for 3.5 s after 1 s of data, with the block timeout
	// off (it would interrupt the sleep at 2 s): the pipeline stalls.
	mod := filepath.Join(dir, "stall.py")
	os.WriteFile(mod, []byte(`
import time
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.n = 0
    def process(self, data):
        self.n += 1
        if self.n == 1000:
            time.sleep(3.5)
`), 0o644)
	cfg := filepath.Join(dir, "ephysd.toml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
channels = 4
[[stage]]
module = %q
[python]
block_timeout_ms = 0
[recording]
parent_directory = "recs"
[control]
start_mode = "acquire"
http = ""
socket = %q
`, mod, filepath.Join(dir, "control.sock"))), 0o644)
	cmd := exec.Command(bin, "run", "--config", cfg)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+sock, "WATCHDOG_USEC=1200000")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(6 * time.Second)
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("exit: %v\n%s", err, stderr.String())
	}
	mu.Lock()
	defer mu.Unlock()
	var ready, stopping time.Time
	var pings []time.Time
	for _, m := range msgs {
		switch {
		case m.text == "READY=1" && ready.IsZero():
			ready = m.at
		case m.text == "STOPPING=1":
			stopping = m.at
		case m.text == "WATCHDOG=1":
			pings = append(pings, m.at)
		}
	}
	if ready.IsZero() || stopping.IsZero() || len(pings) < 4 {
		t.Fatalf("READY %v STOPPING %v, %d pings; messages %v\n%s", ready, stopping, len(pings), msgs, stderr.String())
	}
	t.Logf("READY %v after start", ready.Sub(start).Round(time.Millisecond))
	// The longest silence covers the stall (3.5 s minus the 2 s health
	// limit), and pings come again after it.
	var longest time.Duration
	var resumed bool
	for i := 1; i < len(pings); i++ {
		if d := pings[i].Sub(pings[i-1]); d > longest {
			longest = d
			resumed = i < len(pings)-1 || pings[i].Before(stopping)
		}
	}
	if longest < 1200*time.Millisecond || !resumed {
		t.Fatalf("watchdog pings %v: want a silence longer than the watchdog while the pipeline stalled, then pings again", pings)
	}
	if !strings.Contains(stderr.String(), "pipeline stalled") {
		t.Fatalf("the stall was not logged:\n%s", stderr.String())
	}
}
