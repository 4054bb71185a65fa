package recording

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ephysd/ephysd/pipeline"
)

const crashDirEnv = "EPHYSD_RECORDING_CRASH_DIR"

var crashClock = time.Date(2024, 6, 7, 8, 9, 10, 0, time.UTC)

// crashFeed is what the crashing process records: blocks 0–9 reach the disk
// through the background checkpoint, blocks 10–12 stay in the buffers.
func crashFeed(blocks int) *feed {
	r := &pipeline.Recording{Experiment: 1, Number: 1}
	f := makeFeed([]span{{rec: r, exp: 1, first: 0, blocks: blocks, unknownAt: -1,
		python:   map[int64]pipeline.Event{60: pyEvent(60, 0, true), 120: pyEvent(120, 0, false), 330: pyEvent(330, 1, true)},
		messages: map[int64]string{10: "before the crash", 200: "also before", 310: "lost with the process"}}})
	return f
}

// npyCount reads the record count a .npy header claims.
func npyCount(path string) (int64, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	_, rest, ok := bytes.Cut(data, []byte("'shape': ("))
	if !ok {
		return 0, fmt.Errorf("%s: no shape in the header", path)
	}
	digits, _, _ := bytes.Cut(rest, []byte(","))
	return strconv.ParseInt(string(digits), 10, 64)
}

// TestCrashHelper is the process TestRecorderSurvivesKill kills. It records
// ten blocks, waits until the background ticker has written them (the
// source "stalls"), records three more that stay buffered, says READY and
// waits to be killed.
func TestCrashHelper(t *testing.T) {
	parent := os.Getenv(crashDirEnv)
	if parent == "" {
		t.Skip("run by TestRecorderSurvivesKill")
	}
	s := NewSession(parent, 0, func() time.Time { return crashClock })
	r, err := s.Next()
	if err != nil {
		t.Fatal(err)
	}
	f := crashFeed(13)
	rec, err := NewRecorder(Config{Stream: f.stream, EventChannels: []EventChannel{pythonChannel}, CheckpointInterval: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	for i, b := range f.blocks {
		b.Recording = r
		if i == 10 {
			sn := filepath.Join(RecordingPath(r, 101), "continuous", "Simulated_Headstage-100.sim", "sample_numbers.npy")
			deadline := time.Now().Add(10 * time.Second)
			for {
				if n, _ := npyCount(sn); n == 300 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("the background checkpoint did not write the stalled recording within 10 s")
				}
				time.Sleep(5 * time.Millisecond)
			}
		}
		if err := rec.Consume(b); err != nil {
			t.Fatal(err)
		}
	}
	fmt.Println("READY")
	time.Sleep(time.Minute) // killed long before
}

// TestRecorderSurvivesKill kills a recording process (SIGKILL) after a
// checkpoint and checks that neo and numpy open what it left, with exactly
// the checkpointed samples and events.
func TestRecorderSurvivesKill(t *testing.T) {
	parent := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashHelper$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashDirEnv+"="+parent)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		var out strings.Builder
		for sc.Scan() {
			if sc.Text() == "READY" {
				ready <- ""
				return
			}
			out.WriteString(sc.Text() + "\n")
		}
		ready <- out.String()
	}()
	select {
	case out := <-ready:
		if out != "" {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("the recording process failed:\n%s%s", out, stderr.String())
		}
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("the recording process did not get ready:\n%s", stderr.String())
	}
	if err := cmd.Process.Kill(); err != nil { // SIGKILL: no deferred code, no End
		t.Fatal(err)
	}
	cmd.Wait()

	session := filepath.Join(parent, crashClock.Format(sessionDirLayout))
	r := &pipeline.Recording{Dir: session, Experiment: 1, Number: 1}
	dir := RecordingPath(r, 101)
	want := crashFeed(10) // what the checkpoint covered
	dat, err := os.ReadFile(filepath.Join(dir, "continuous", "Simulated_Headstage-100.sim", "continuous.dat"))
	if err != nil {
		t.Fatal(err)
	}
	if len(dat) != 300*4*2 {
		t.Errorf("continuous.dat holds %d bytes after the kill, want the 300 checkpointed samples (%d bytes)", len(dat), 300*8)
	}
	v := readWithNeo(t, session, want)
	seg, ok := v.Segments["1/1"]
	if !ok || v.NbBlock != 1 {
		t.Fatalf("neo sees %d blocks, segments %v", v.NbBlock, v.Segments)
	}
	if sv := seg.Streams["sim"]; sv.Size != 300 || sv.Mismatches != 0 {
		t.Errorf("neo reads %d samples (%d wrong values), want the 300 checkpointed", sv.Size, sv.Mismatches)
	}
	rp := "Record Node 101/experiment1/recording1/"
	for _, rel := range []string{"continuous/Simulated_Headstage-100.sim/sample_numbers.npy", "continuous/Simulated_Headstage-100.sim/timestamps.npy"} {
		if got := v.Files[rp+rel].Shape; len(got) != 1 || got[0] != 300 {
			t.Errorf("numpy: %s has shape %v, want (300,)", rel, got)
		}
	}
	states, sns, words := ttlView(want.events["1/1"], 100)
	if got := v.Files[rp+"events/Simulated_Headstage-100.sim/TTL/states.npy"].Values; !floatsEqual(anyFloats(got), states) {
		t.Errorf("numpy: TTL states %v, want %v", got, states)
	}
	if got := v.Files[rp+"events/Simulated_Headstage-100.sim/TTL/sample_numbers.npy"].Values; !floatsEqual(anyFloats(got), sns) {
		t.Errorf("numpy: TTL sample numbers %v, want %v", got, sns)
	}
	if got := v.Files[rp+"events/Simulated_Headstage-100.sim/TTL/full_words.npy"].Values; !floatsEqual(anyFloats(got), words) {
		t.Errorf("numpy: TTL full words %v, want %v", got, words)
	}
	if got := v.Files[rp+"events/Python_Processor-101.sim/TTL/sample_numbers.npy"].Values; !floatsEqual(anyFloats(got), []float64{60, 120}) {
		t.Errorf("numpy: Python event sample numbers %v, want [60 120]", got)
	}
	times, _, _ := neoEpochs(states, sns, 30000)
	if e := seg.Events["TTL Input"]; e.Count != len(times) || !floatsEqual(e.Times, times) {
		t.Errorf("neo TTL %v, want %v", e.Times, times)
	}
	if m := seg.Events["Messages"]; strings.Join(m.Labels, "|") != "before the crash|also before" {
		t.Errorf("neo messages %q, want the two checkpointed", m.Labels)
	}
}
