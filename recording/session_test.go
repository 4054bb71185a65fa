package recording

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ephysd/ephysd/pipeline"
)

func TestSessionNumbering(t *testing.T) {
	parent := filepath.Join(t.TempDir(), "data") // made on demand
	clock := time.Date(2024, 3, 5, 14, 7, 9, 0, time.Local)
	s := NewSession(parent, 0, func() time.Time { return clock })
	if s.RecordNodeID() != 101 {
		t.Errorf("default record node id %d, want 101", s.RecordNodeID())
	}
	if s.Dir() != "" {
		t.Errorf("Dir before the first record start = %q, want empty", s.Dir())
	}
	// A stop of acquisition before anything was recorded changes nothing.
	s.AcquisitionStopped()

	dir := filepath.Join(parent, "2024-03-05_14-07-09")
	next := func(wantDir string, exp, num int) {
		t.Helper()
		r, err := s.Next()
		if err != nil {
			t.Fatal(err)
		}
		want := pipeline.Recording{Dir: wantDir, Experiment: exp, Number: num}
		if *r != want {
			t.Fatalf("Next() = %+v, want %+v", *r, want)
		}
		if fi, err := os.Stat(r.Dir); err != nil || !fi.IsDir() {
			t.Fatalf("session folder %s not created: %v", r.Dir, err)
		}
	}
	next(dir, 1, 1) // record start
	next(dir, 1, 2) // record stop, start again while acquiring
	next(dir, 1, 3)
	s.AcquisitionStopped() // acquisition stops after recordings
	s.AcquisitionStopped() // and again without recording: no empty experiment
	clock = clock.Add(time.Hour)
	next(dir, 2, 1) // same folder, new experiment
	next(dir, 2, 2)
	s.AcquisitionStopped()
	next(dir, 3, 1)

	// A new directory: new dated folder, numbering from 1.
	s.StartNewDirectory()
	if s.Dir() != "" {
		t.Errorf("Dir after StartNewDirectory = %q, want empty until the next start", s.Dir())
	}
	dir2 := filepath.Join(parent, "2024-03-05_15-07-09")
	next(dir2, 1, 1)
	s.AcquisitionStopped()
	s.StartNewDirectory()
	// The same second again (or a stranger's folder): a suffix, not reuse.
	next(dir2+"_2", 1, 1)

	if got := RecordingPath(&pipeline.Recording{Dir: dir, Experiment: 2, Number: 3}, 0); got != filepath.Join(dir, "Record Node 101", "experiment2", "recording3") {
		t.Errorf("RecordingPath = %q", got)
	}
	if got := RecordingPath(&pipeline.Recording{Dir: "/d", Experiment: 1, Number: 1}, 104); got != "/d/Record Node 104/experiment1/recording1" {
		t.Errorf("RecordingPath = %q", got)
	}
}

func TestSessionDoesNotReuseExistingFolder(t *testing.T) {
	parent := t.TempDir()
	clock := time.Date(2025, 1, 2, 3, 4, 5, 0, time.Local)
	name := "2025-01-02_03-04-05"
	for _, d := range []string{name, name + "_2"} {
		if err := os.Mkdir(filepath.Join(parent, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	s := NewSession(parent, 102, func() time.Time { return clock })
	r, err := s.Next()
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(parent, name+"_3"); r.Dir != want {
		t.Errorf("Dir = %q, want %q", r.Dir, want)
	}
}

func TestSessionUnwritableParent(t *testing.T) {
	parent := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(parent, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := NewSession(parent, 0, nil).Next()
	if err == nil {
		t.Fatal("Next succeeded with a file as parent folder")
	}
	t.Log(err)
}

func TestSessionNaming(t *testing.T) {
	parent := t.TempDir()
	at := time.Date(2026, 11, 21, 9, 30, 0, 0, time.UTC)
	s := NewSession(parent, 0, func() time.Time { return at })
	r1, err := s.Next()
	if err != nil || filepath.Base(r1.Dir) != "2026-11-21_09-30-00" {
		t.Fatalf("%v %v", r1, err)
	}
	other := filepath.Join(parent, "elsewhere")
	s.SetNaming(Naming{Parent: other, Prepend: "mouse7_", Append: "_day3"})
	r2, err := s.Next()
	if err != nil || r2.Dir != filepath.Join(other, "mouse7_2026-11-21_09-30-00_day3") || r2.Experiment != 1 || r2.Number != 1 {
		t.Fatalf("%+v %v", r2, err)
	}
	s.SetNaming(Naming{Prepend: "mouse7_", Base: "baseline", Append: "_day3"})
	r3, _ := s.Next()
	if r3.Dir != filepath.Join(other, "mouse7_baseline_day3") {
		t.Fatalf("%+v", r3)
	}
	if n := s.Naming(); n.Parent != other || n.Base != "baseline" {
		t.Fatalf("%+v", n)
	}
	// The same naming again keeps the folder.
	s.SetNaming(s.Naming())
	if r4, _ := s.Next(); r4.Dir != r3.Dir || r4.Number != 2 {
		t.Fatalf("%+v", r4)
	}
}
