package daemon

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
)

const hookLogger = `
import os
LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hooks.log")
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        with open(LOG, "a") as f: f.write("init %d\n" % num_channels)
    def start_acquisition(self):
        with open(LOG, "a") as f: f.write("start_acquisition\n")
    def stop_acquisition(self):
        with open(LOG, "a") as f: f.write("stop_acquisition\n")
    def start_recording(self, recording_dir):
        with open(LOG, "a") as f: f.write("start_recording %s\n" % os.path.basename(recording_dir))
    def stop_recording(self):
        with open(LOG, "a") as f: f.write("stop_recording\n")
    def process(self, data):
        pass
`

func newTestService(t *testing.T, extra string) (*Service, string, string) {
	t.Helper()
	dir := t.TempDir()
	mod := filepath.Join(dir, "hooks.py")
	os.WriteFile(mod, []byte(hookLogger), 0o644)
	path := filepath.Join(dir, "ephysd.toml")
	doc := fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
channels = 4
[[stage]]
module = %q
[recording]
parent_directory = %q
[control]
http = ""
%s`, mod, filepath.Join(dir, "recs"), extra)
	os.WriteFile(path, []byte(doc), 0o644)
	cfg, err := LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := NewService(cfg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() })
	return svc, dir, path
}

func hookLog(t *testing.T, dir string) string {
	data, _ := os.ReadFile(filepath.Join(dir, "hooks.log"))
	return strings.ReplaceAll(strings.TrimSpace(string(data)), "\n", " | ")
}

// The state machine: IDLE → RECORD goes through ACQUIRE, RECORD → IDLE
// stops recording first, the Python hooks run at each step, the stage
// instance lives across acquisitions, and the folders and numbers are
// Open Ephys's.
func TestServiceTransitionsHooksAndNumbering(t *testing.T) {
	svc, dir, _ := newTestService(t, "")
	svc.Session().SetNaming(svc.Session().Naming()) // unchanged naming is a no-op
	step := func(m Mode) {
		t.Helper()
		if err := svc.SetMode(m); err != nil {
			t.Fatal(err)
		}
		if svc.Mode() != m {
			t.Fatalf("mode %s, want %s", svc.Mode(), m)
		}
		time.Sleep(150 * time.Millisecond)
	}
	step(Record)  // experiment 1, recording 1
	step(Acquire) // recording stops
	step(Record)  // recording 2
	step(Idle)    // experiment ends
	n := svc.Session().Naming()
	n.Prepend, n.Append = "m7_", "_day3"
	svc.Session().SetNaming(n)
	step(Record) // new folder, experiment 1 again
	step(Idle)

	want := "init 4 | start_acquisition | start_recording X | stop_recording | start_recording X | stop_recording | stop_acquisition | " +
		"start_acquisition | start_recording Y | stop_recording | stop_acquisition"
	got := hookLog(t, dir)
	sessions, _ := filepath.Glob(filepath.Join(dir, "recs", "*"))
	if len(sessions) != 2 {
		t.Fatalf("session folders %v", sessions)
	}
	var named, dated string
	for _, s := range sessions {
		if strings.HasPrefix(filepath.Base(s), "m7_") && strings.HasSuffix(s, "_day3") {
			named = s
		} else {
			dated = s
		}
	}
	if named == "" || dated == "" {
		t.Fatalf("folders %v: want one dated and one m7_<date>_day3", sessions)
	}
	want = strings.ReplaceAll(strings.ReplaceAll(want, "X", filepath.Base(dated)), "Y", filepath.Base(named))
	if got != want {
		t.Fatalf("hooks\n got %s\nwant %s", got, want)
	}
	for _, p := range []string{
		filepath.Join(dated, "Record Node 102", "experiment1", "recording1", "structure.oebin"),
		filepath.Join(dated, "Record Node 102", "experiment1", "recording2", "structure.oebin"),
		filepath.Join(named, "Record Node 102", "experiment1", "recording1", "structure.oebin"),
	} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("missing %s", p)
		}
	}
}

func TestServiceMessageNeedsAcquisition(t *testing.T) {
	svc, _, _ := newTestService(t, "")
	if err := svc.Message("hello"); err == nil || !strings.Contains(err.Error(), "not acquiring") {
		t.Fatalf("message while IDLE: %v", err)
	}
	if err := svc.SetMode(Acquire); err != nil {
		t.Fatal(err)
	}
	if err := svc.Message("hello"); err != nil {
		t.Fatal(err)
	}
	if _, err := ParseMode("flying"); err == nil {
		t.Fatal("bad mode accepted")
	}
	if m, _ := ParseMode("record"); m != Record {
		t.Fatal("lower-case mode")
	}
}

// Reload while acquiring: a changed module path is loaded at once without
// stopping acquisition; a source change is deferred and said so.
func TestServiceReloadWhileAcquiring(t *testing.T) {
	svc, dir, path := newTestService(t, "")
	if err := svc.SetMode(Acquire); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	before := svc.Chain()
	other := filepath.Join(dir, "other.py")
	os.WriteFile(other, []byte("class PyProcessor:\n    def __init__(self, p, n, r):\n        pass\n    def process(self, data):\n        data += 1\n"), 0o644)
	doc, _ := os.ReadFile(path)
	edited := strings.Replace(string(doc), filepath.Join(dir, "hooks.py"), other, 1)
	edited = strings.Replace(edited, "channels = 4", "channels = 6", 1)
	os.WriteFile(path, []byte(edited), 0o644)
	notes, err := svc.Reload(path)
	if err != nil {
		t.Fatal(err)
	}
	if svc.Chain() != before || svc.Mode() != Acquire {
		t.Fatal("reload restarted acquisition")
	}
	if !strings.Contains(notes, "next acquisition") {
		t.Fatalf("notes %q: the source change must be reported as deferred", notes)
	}
	if st := svc.Stages()[0]; st.Path() != other || st.Status().State != "running" {
		t.Fatalf("stage %+v", st.Status())
	}
	if ov := before.Runner.Stats().OverrunBlocks; ov != 0 {
		t.Fatalf("%d overruns across the reload", ov)
	}
	// The deferred change applies at the next acquisition.
	svc.SetMode(Idle)
	if err := svc.SetMode(Acquire); err != nil {
		t.Fatal(err)
	}
	if ch := svc.Status().Source.Channels; ch != 6 {
		t.Fatalf("channels %d after restart, want 6", ch)
	}
}

func TestServiceModulesOnlyFromAllowedFolders(t *testing.T) {
	svc, dir, _ := newTestService(t, "")
	if err := svc.SetMode(Acquire); err != nil {
		t.Fatal(err)
	}
	outside := filepath.Join(t.TempDir(), "evil.py")
	os.WriteFile(outside, []byte("class PyProcessor:\n    def process(self, data): pass\n"), 0o644)
	if err := svc.SetStageModule(101, outside); err == nil || !strings.Contains(err.Error(), "module_dirs") {
		t.Fatalf("module outside the allowed folders: %v", err)
	}
	inside := filepath.Join(dir, "fine.py")
	os.WriteFile(inside, []byte("class PyProcessor:\n    def __init__(self, p, n, r): pass\n    def process(self, data): pass\n"), 0o644)
	if err := svc.SetStageModule(101, inside); err != nil {
		t.Fatal(err)
	}
	if err := svc.SetStageModule(999, inside); err == nil {
		t.Fatal("unknown stage id accepted")
	}
}

func TestServiceHealthAndSourceEnd(t *testing.T) {
	svc, _, _ := newTestService(t, "")
	if err := svc.Healthy(); err != nil {
		t.Fatalf("idle: %v", err)
	}
	if err := svc.CheckSource(); err != nil {
		t.Fatal(err)
	}
	if err := svc.SetMode(Acquire); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if err := svc.Healthy(); err != nil {
		t.Fatalf("acquiring: %v", err)
	}
	// The source ends by itself: the service goes back to IDLE and says why.
	svc.Chain().Source.Stop()
	select {
	case <-svc.Ended():
	case <-time.After(5 * time.Second):
		t.Fatal("the end of the source was not noticed")
	}
	if svc.Mode() != Idle || svc.LastError() == "" {
		t.Fatalf("mode %s, last error %q", svc.Mode(), svc.LastError())
	}
}
