package recording

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ephysd/ephysd/pipeline"
)

// faultDisk is a disk of limited room in front of the real one: writes
// that extend files take from its free bytes and fail with ENOSPC, after
// writing what fits, once there is none (like a full filesystem). Header
// rewrites in place (WriteAt) take no room. It counts syncs per file.
type faultDisk struct {
	mu    sync.Mutex
	free  int64
	syncs map[string]int
}

func newFaultDisk(free int64) *faultDisk {
	return &faultDisk{free: free, syncs: map[string]int{}}
}

func (d *faultDisk) setFree(n int64) {
	d.mu.Lock()
	d.free = n
	d.mu.Unlock()
}

func (d *faultDisk) open(name string, flag int, perm os.FileMode) (File, error) {
	f, err := os.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return &faultFile{File: f, d: d}, nil
}

type faultFile struct {
	*os.File
	d *faultDisk
}

func (f *faultFile) Write(p []byte) (int, error) {
	f.d.mu.Lock()
	n := int64(len(p))
	if n > f.d.free {
		n = f.d.free
	}
	f.d.free -= n
	f.d.mu.Unlock()
	k, err := f.File.Write(p[:n])
	if err == nil && k < len(p) {
		err = &os.PathError{Op: "write", Path: f.Name(), Err: syscall.ENOSPC}
	}
	return k, err
}

func (f *faultFile) Sync() error {
	f.d.mu.Lock()
	f.d.syncs[f.Name()]++
	f.d.mu.Unlock()
	return f.File.Sync()
}

// TestRecorderDiskFullStopsOnlyTheRecording fills the disk in the middle
// of a recording with Config.OnError set: Consume keeps returning nil,
// OnError is called once with the file and "disk full", the rest of that
// recording's blocks are counted as lost, the recording is made
// consistent and neo reads it, and once there is room again the next
// recording is written whole.
func TestRecorderDiskFullStopsOnlyTheRecording(t *testing.T) {
	parent := t.TempDir()
	s := NewSession(parent, 0, nil)
	r1, _ := s.Next()
	// The next recording goes to another session folder: neo 0.11 fails
	// on an experiment whose recordings have different event channels.
	s.StartNewDirectory()
	r2, _ := s.Next()
	f := makeFeed([]span{
		{rec: r1, exp: 1, first: 0, blocks: 20, unknownAt: -1, python: map[int64]pipeline.Event{60: pyEvent(60, 0, true)}},
		{rec: r2, exp: 1, first: 600, blocks: 5, unknownAt: -1, python: map[int64]pipeline.Event{630: pyEvent(630, 0, true)}},
	})
	// (neo 0.11 cannot open a recording without any event either.)
	f2 := makeFeed([]span{{rec: r2, exp: 1, first: 600, blocks: 5, unknownAt: -1, python: map[int64]pipeline.Event{630: pyEvent(630, 0, true)}}})
	disk := newFaultDisk(4000) // the headers (~1.4 kB) and a few blocks
	type failure struct {
		rec pipeline.Recording
		err error
	}
	failures := make(chan failure, 10)
	rec, err := NewRecorder(Config{
		Stream: f.stream, EventChannels: []EventChannel{pythonChannel}, CheckpointInterval: time.Nanosecond,
		OpenFile: disk.open,
		OnError:  func(r pipeline.Recording, err error) { failures <- failure{r, err} },
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range f.blocks[:20] {
		if err := rec.Consume(b); err != nil {
			t.Fatalf("Consume returned %v with OnError set", err)
		}
	}
	var fl failure
	select {
	case fl = <-failures:
	default:
		t.Fatal("OnError was not called when the disk filled up")
	}
	if fl.rec != *r1 || !strings.Contains(fl.err.Error(), RecordingPath(r1, 101)) ||
		!strings.Contains(fl.err.Error(), "no space left on device (disk full: free space") {
		t.Fatalf("OnError(%+v, %v)", fl.rec, fl.err)
	}
	st := rec.Stats()
	if st.Failures != 1 || st.LostSamples == 0 || st.Samples+st.LostSamples > 600 {
		t.Errorf("stats %+v: want 1 failure and the blocks after it lost", st)
	}

	disk.setFree(1 << 40) // space freed
	for _, b := range f.blocks[20:] {
		if err := rec.Consume(b); err != nil {
			t.Fatal(err)
		}
	}
	if err := rec.End(); err != nil {
		t.Fatal(err)
	}
	if len(failures) != 0 {
		t.Errorf("%d more OnError calls", len(failures))
	}
	d1 := RecordingPath(r1, 101)
	if fileExists(filepath.Join(d1, UnfinishedMarker)) {
		t.Error("the failed recording was not recovered in the background")
	}
	if rep := mustRecover(t, parent); rep.Changed() {
		t.Errorf("recordings left inconsistent:\n%s", rep)
	}
	kept, err := npyCount(filepath.Join(d1, "continuous", "Simulated_Headstage-100.sim", "sample_numbers.npy"))
	if err != nil {
		t.Fatal(err)
	}
	if kept == 0 || kept >= 600 {
		t.Fatalf("the failed recording kept %d samples", kept)
	}
	f.inputs["1/1/sim"] = f.inputs["1/1/sim"][:4*kept]
	v := readWithNeo(t, r1.Dir, f)
	if sv := v.Segments["1/1"].Streams["sim"]; sv.Size != int(kept) || sv.Mismatches != 0 {
		t.Errorf("neo reads %d samples (%d wrong) of the failed recording, want %d", sv.Size, sv.Mismatches, kept)
	}
	v = readWithNeo(t, r2.Dir, f2)
	if sv := v.Segments["1/1"].Streams["sim"]; sv.Size != 150 || sv.Mismatches != 0 {
		t.Errorf("neo reads %d samples (%d wrong) of the next recording, want 150", sv.Size, sv.Mismatches)
	}
	t.Logf("disk full after %d samples; %d kept, %d lost after the failure", st.Samples, kept, st.LostSamples)
}

// TestFsyncCheckpoint: with FsyncCheckpoint every open file is synced at
// each checkpoint, and the hot path still allocates nothing.
func TestFsyncCheckpoint(t *testing.T) {
	disk := newFaultDisk(1 << 40)
	st := pipeline.StreamInfo{ProcessorName: "Acquisition Board", ProcessorID: 100, StreamName: "Rhythm_Data", SampleRate: 30000}
	for c := 0; c < 16; c++ {
		st.Channels = append(st.Channels, pipeline.ChannelInfo{Name: "CH", Units: "uV", BitVolts: 0.195})
	}
	rec, err := NewRecorder(Config{Stream: st, EventChannels: []EventChannel{pythonChannel}, CheckpointInterval: time.Millisecond,
		Fsync: FsyncCheckpoint, OpenFile: disk.open})
	if err != nil {
		t.Fatal(err)
	}
	defer rec.End()
	s := NewSession(t.TempDir(), 0, nil)
	r, _ := s.Next()
	b := &pipeline.Block{Channels: 16, Samples: blockSamples, Data: make([]float32, 16*blockSamples),
		Digital: make([]uint64, blockSamples), Events: make([]pipeline.Event, 0, 8), Recording: r}
	var first int64
	for i := 0; i < 500; i++ {
		consumeSteady(t, rec, b, first)
		first += blockSamples
	}
	allocs := testing.AllocsPerRun(500, func() {
		consumeSteady(t, rec, b, first)
		first += blockSamples
	})
	if allocs != 0 {
		t.Errorf("Consume allocates %v times per block with FsyncCheckpoint", allocs)
	}
	cps := rec.Stats().Checkpoints
	disk.mu.Lock()
	defer disk.mu.Unlock()
	dir := RecordingPath(r, 101)
	for _, rel := range []string{"continuous/Acquisition_Board-100.Rhythm_Data/continuous.dat", "events/Acquisition_Board-100.Rhythm_Data/TTL/states.npy",
		"events/Python_Processor-101.Rhythm_Data/TTL/full_words.npy"} {
		// Event files exist from the first checkpoint after their first event.
		if n := disk.syncs[filepath.Join(dir, rel)]; uint64(n) < cps-1 || cps < 10 {
			t.Errorf("%s synced %d times in %d checkpoints", rel, n, cps)
		}
	}
}

// BenchmarkCheckpointCost records a 384-channel, 30 kHz stream paced in
// real time (1 ms blocks) for 3 s into the test's temporary folder (a real
// disk unless TMPDIR is a tmpfs), for each flush interval and fsync policy,
// and reports how long checkpoints took: the recorder's goroutine is busy
// that long each interval (the Python stages and the outputs are not: they
// run on another thread, with a queue of queue_ms in between).
func BenchmarkCheckpointCost(b *testing.B) {
	for _, interval := range []time.Duration{100 * time.Millisecond, time.Second} {
		for _, policy := range []FsyncPolicy{FsyncClose, FsyncCheckpoint} {
			b.Run(fmt.Sprintf("flush=%s/fsync=%s", interval, policy), func(b *testing.B) {
				for i := 0; i < b.N; i++ {
					rec, blk := hotPathRecorder(b, 384, interval)
					rec.cfg.Fsync = policy
					start := time.Now()
					var first int64
					for k := 0; k < 3000; k++ {
						if d := time.Until(start.Add(time.Duration(k+1) * time.Millisecond)); d > 0 {
							time.Sleep(d)
						}
						consumeSteady(b, rec, blk, first)
						first += blockSamples
					}
					h := rec.CheckpointTime()
					ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
					b.ReportMetric(ms(h.Quantile(0.5)), "p50-ms")
					b.ReportMetric(ms(h.Quantile(0.99)), "p99-ms")
					b.ReportMetric(ms(h.Max()), "max-ms")
					b.ReportMetric(float64(rec.Stats().Checkpoints), "checkpoints")
					if err := rec.End(); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
