package daemon

import (
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Under systemd's journal (JOURNAL_STREAM names stderr) lines start with the
// syslog priority and carry no timestamp; elsewhere (not a terminal) JSON.
func TestLoggerFormats(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "stderr")
	if err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	syscall.Fstat(int(f.Fd()), &st)
	t.Setenv("JOURNAL_STREAM", fmt.Sprintf("%d:%d", st.Dev, st.Ino))
	log, err := NewLogger("debug", "auto", f)
	if err != nil {
		t.Fatal(err)
	}
	log.Error("disk full")
	log.Warn("overrun")
	log.Info("ready")
	log.Debug("detail")
	log.Sync()
	data, _ := os.ReadFile(f.Name())
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	want := []string{"<3>", "<4>", "<6>", "<7>"}
	if len(lines) != 4 {
		t.Fatalf("%q", data)
	}
	for i, l := range lines {
		if !strings.HasPrefix(l, want[i]) || strings.Contains(l, time.Now().UTC().Format("2006-01-02T")) {
			t.Fatalf("line %q: want prefix %s and no timestamp", l, want[i])
		}
	}
	// Another stream than the journal's: JSON.
	t.Setenv("JOURNAL_STREAM", "1:1")
	g, _ := os.CreateTemp(t.TempDir(), "stderr")
	log, _ = NewLogger("info", "auto", g)
	log.Info("ready")
	log.Sync()
	data, _ = os.ReadFile(g.Name())
	if !strings.HasPrefix(string(data), `{"level":"info"`) {
		t.Fatalf("not JSON: %q", data)
	}
}
