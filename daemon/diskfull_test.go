package daemon

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/drivers/pulsepal/pulsepaltest"
	"github.com/ephysd/ephysd/drivers/sim"
	"github.com/ephysd/ephysd/recording"
)

// smallDisk is where the disk-full test records: a 16 MiB tmpfs mounted
// for the test, most of it taken by a filler file, or, where mounting is
// not allowed (a container without CAP_SYS_ADMIN), a fault-injecting disk
// in front of the test's folder that fails writes with ENOSPC once its
// budget is spent.
type smallDisk struct {
	dir    string
	filler string      // the tmpfs: a file whose removal frees the room
	fault  *budgetDisk // the fallback
	open   func(string, int, os.FileMode) (recording.File, error)
}

func newSmallDisk(t *testing.T) *smallDisk {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "small")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=16m,mode=0755")
	if err == nil {
		t.Cleanup(func() { syscall.Unmount(dir, syscall.MNT_DETACH) })
		filler := filepath.Join(dir, "filler")
		if err := os.WriteFile(filler, make([]byte, 13<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("recording to a 16 MiB tmpfs with 3 MiB free")
		return &smallDisk{dir: dir, filler: filler}
	}
	t.Logf("mounting a tmpfs failed (%v): recording through a fault-injecting disk with 3 MiB of room", err)
	d := &budgetDisk{free: 3 << 20}
	return &smallDisk{dir: dir, fault: d, open: d.open}
}

// free makes room again.
func (s *smallDisk) free(t *testing.T) {
	t.Helper()
	if s.fault != nil {
		s.fault.setFree(1 << 40)
		return
	}
	if err := os.Remove(s.filler); err != nil {
		t.Fatal(err)
	}
}

// budgetDisk fails writes that extend a file with ENOSPC, after writing
// what fits, once its free bytes are spent, as a full filesystem does.
type budgetDisk struct {
	mu   sync.Mutex
	free int64
}

func (d *budgetDisk) setFree(n int64) {
	d.mu.Lock()
	d.free = n
	d.mu.Unlock()
}

func (d *budgetDisk) open(name string, flag int, perm os.FileMode) (recording.File, error) {
	f, err := os.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return &budgetFile{File: f, d: d}, nil
}

type budgetFile struct {
	*os.File
	d *budgetDisk
}

func (f *budgetFile) Write(p []byte) (int, error) {
	f.d.mu.Lock()
	n := min(int64(len(p)), f.d.free)
	f.d.free -= n
	f.d.mu.Unlock()
	k, err := f.File.Write(p[:n])
	if err == nil && k < len(p) {
		err = &os.PathError{Op: "write", Path: f.Name(), Err: syscall.ENOSPC}
	}
	return k, err
}

var _ io.Writer = (*budgetFile)(nil)

// TestDiskFullStopsRecordingOnly records 32 channels at 30 kHz onto a disk
// that fills up after about a second: the recording stops with an error
// that names the file and says the disk is full, the service goes from
// RECORD to ACQUIRE and reports the error in its status and metrics,
// while blocks keep flowing through the Python stage to the TTL output.
// The stopped recording is made consistent (neo reads it, and it holds
// exactly the simulator's samples); once room is made, a new recording
// starts and is finalised normally.
func TestDiskFullStopsRecordingOnly(t *testing.T) {
	disk := newSmallDisk(t)
	pp := pulsepaltest.Start(t, pulsepaltest.Options{})
	dir := t.TempDir()
	mod := filepath.Join(dir, "pulser.py")
	os.WriteFile(mod, []byte(pulsingModule), 0o644)
	socket := filepath.Join(dir, "control.sock")
	cfg, err := ParseConfig(filepath.Join(dir, "x.toml"), []byte(fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
channels = 32
seed = 3
[[stage]]
module = %q
[[output]]
driver = "pulsepal"
[output.pulsepal]
path = %q
[[output.pulsepal.map]]
line = 0
channel = 2
mode = "trigger"
[recording]
parent_directory = %q
flush_ms = 100
[control]
http = ""
socket = %q
`, mod, pp.Path, disk.dir, socket)))
	if err != nil {
		t.Fatal(err)
	}
	svc, err := NewService(cfg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	svc.recordingOpenFile = disk.open
	t.Cleanup(func() { svc.Close() })
	metrics := NewMetrics(svc)
	control, err := NewControl(svc, zap.NewNop(), ControlOptions{Metrics: metrics.Handler()})
	if err != nil {
		t.Fatal(err)
	}
	defer control.Close()
	d := &daemonProc{socket: control.SocketPath(), done: make(chan struct{}), stderr: &lockedBuffer{}}

	if err := svc.SetMode(Record); err != nil {
		t.Fatal(err)
	}
	st := d.waitStatus(t, "the recording to fail", 60*time.Second, func(st *ControlStatus) bool { return st.RecordingError != "" })
	failedAt := st.Pipeline.Blocks
	triggersAt := len(pp.Triggers())
	msg := st.RecordingError
	if st.Mode != Acquire || st.Recording != nil || st.RecordingFailures != 1 ||
		!strings.Contains(msg, "no space left on device (disk full") || !strings.Contains(msg, disk.dir+"/") {
		t.Fatalf("status after the disk filled: mode %s, recording %+v, failures %d, error %q", st.Mode, st.Recording, st.RecordingFailures, msg)
	}
	t.Logf("recording error: %s", msg)
	sc := doScrape(t, metrics)
	if sc.value(t, "ephysd_recording_failed") != 1 || sc.value(t, "ephysd_recording_failures_total") != 1 || sc.value(t, "ephysd_mode", "mode", "ACQUIRE") != 1 {
		t.Errorf("metrics: recording_failed %v, failures %v, ACQUIRE %v", sc.value(t, "ephysd_recording_failed"),
			sc.value(t, "ephysd_recording_failures_total"), sc.value(t, "ephysd_mode", "mode", "ACQUIRE"))
	}
	if s := systemdStatus(svc); !strings.Contains(s, "recording FAILED") {
		t.Errorf("systemd status %q does not say the recording failed", s)
	}

	// Acquisition, Python and the TTL output go on.
	st = d.waitStatus(t, "blocks after the failure", 30*time.Second, func(st *ControlStatus) bool {
		return st.Pipeline.Blocks >= failedAt+1000 && len(pp.Triggers()) >= triggersAt+10
	})
	if st.Mode != Acquire || st.Pipeline.Overruns != 0 || st.Stages[0].State != "running" {
		t.Errorf("after the failure: mode %s, %d overruns, stage %s", st.Mode, st.Pipeline.Overruns, st.Stages[0].State)
	}

	// The stopped recording is made consistent in the background.
	recs := recordingDirs(t, disk.dir)
	if len(recs) != 1 {
		t.Fatalf("recordings %v", recs)
	}
	failed := recs[0]
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(filepath.Join(failed, recording.UnfinishedMarker)); errors.Is(err, os.ErrNotExist) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the stopped recording was not made consistent")
		}
	}
	checkConsistent(t, failed)
	simCfg := *cfg.Driver.(*sim.Config)
	rs := readStream(t, failed)
	checkAgainstSim(t, rs, simCfg)

	// Room again: a new recording starts and is finalised.
	disk.free(t)
	if err := svc.SetMode(Record); err != nil {
		t.Fatal(err)
	}
	st = d.waitStatus(t, "the new recording", 30*time.Second, func(st *ControlStatus) bool {
		return st.Recording != nil && st.Recording.Seconds > 1.2
	})
	if st.RecordingError != "" || st.RecordingFailures != 1 {
		t.Errorf("new recording: error %q, failures %d", st.RecordingError, st.RecordingFailures)
	}
	if v := doScrape(t, metrics).value(t, "ephysd_recording_failed"); v != 0 {
		t.Errorf("ephysd_recording_failed = %v while recording again", v)
	}
	next := st.Recording.Path
	if err := svc.SetMode(Idle); err != nil {
		t.Fatal(err)
	}
	checkConsistent(t, next)
	rs2 := readStream(t, next)
	checkAgainstSim(t, rs2, simCfg)
	view := neoRead(t, failed, next)
	for _, r := range []*recordedStream{rs, rs2} {
		if segs := view[r.dir]; len(segs) != 1 || segs[0].Size != len(r.sn) {
			t.Errorf("neo reads %+v of %s, want %d samples", segs, r.dir, len(r.sn))
		}
	}
	t.Logf("disk full after %d samples: recording stopped, %d samples kept and read by neo; %d blocks and %d output triggers after the failure; the next recording holds %d samples",
		len(rs.sn), len(rs.sn), st.Pipeline.Blocks-failedAt, len(pp.Triggers())-triggersAt, len(rs2.sn))
}
