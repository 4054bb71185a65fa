package recording

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io/fs"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ephysd/ephysd/pipeline"
)

// snapshot reads every file below dir.
func snapshot(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := os.ReadFile(p)
		out[p] = data
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func sameSnapshot(t *testing.T, what string, a, b map[string][]byte) {
	t.Helper()
	for p, data := range a {
		if other, ok := b[p]; !ok {
			t.Errorf("%s: %s disappeared", what, p)
		} else if !bytes.Equal(data, other) {
			t.Errorf("%s: %s changed", what, p)
		}
	}
	for p := range b {
		if _, ok := a[p]; !ok {
			t.Errorf("%s: %s appeared", what, p)
		}
	}
}

// mustRecover runs Recover and fails on an error.
func mustRecover(t *testing.T, dir string) *RecoveryReport {
	t.Helper()
	rep, err := Recover(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := rep.Err(); err != nil {
		t.Fatalf("recover %s: %v\n%s", dir, err, rep)
	}
	return rep
}

// TestRecoverChangesNothingInAFinishedRecording records four recordings
// (raw stream, TTL, Python events, messages) and recovers them: no file
// changes, no warning, no marker left by the recorder.
func TestRecoverChangesNothingInAFinishedRecording(t *testing.T) {
	parent := t.TempDir()
	s := NewSession(parent, 0, nil)
	r1, _ := s.Next()
	r2, _ := s.Next()
	s.AcquisitionStopped()
	r3, _ := s.Next()
	r4, _ := s.Next() // TTL edges only: no Python channel, no messages
	f := makeFeed([]span{
		{rec: r1, exp: 1, first: 0, blocks: 10, unknownAt: -1,
			python:   map[int64]pipeline.Event{60: pyEvent(60, 0, true), 120: pyEvent(120, 0, false)},
			messages: map[int64]string{10: "hello", 200: "a longer message"}},
		{rec: r2, exp: 1, first: 300, blocks: 4, unknownAt: -1, messages: map[int64]string{301: "second"}},
		{rec: r3, exp: 2, first: 0, blocks: 5, unknownAt: -1, python: map[int64]pipeline.Event{30: pyEvent(30, 1, true)}},
		{rec: r4, exp: 1, first: 150, blocks: 3, unknownAt: -1},
	})
	record(t, Config{Stream: f.stream, RecordRaw: true, EventChannels: []EventChannel{pythonChannel}}, f)
	for _, r := range []*pipeline.Recording{r1, r2, r3, r4} {
		if fileExists(filepath.Join(RecordingPath(r, 101), UnfinishedMarker)) {
			t.Fatalf("%s: the recorder left its marker in a finished recording", RecordingPath(r, 101))
		}
	}
	before := snapshot(t, parent)
	for _, dir := range []string{parent, r1.Dir, filepath.Join(r1.Dir, "Record Node 101"), RecordingPath(r3, 101)} {
		rep := mustRecover(t, dir)
		want := 4
		if dir == RecordingPath(r3, 101) {
			want = 1
		}
		if len(rep.Recordings) != want || rep.Changed() {
			t.Fatalf("recover %s: %d recordings, changed %v, want %d unchanged:\n%s", dir, len(rep.Recordings), rep.Changed(), want, rep)
		}
		for _, rr := range rep.Recordings {
			if rr.Unfinished || len(rr.Warnings) > 0 || !strings.Contains(rr.String(), "consistent, nothing to do") {
				t.Errorf("recover %s: %s", dir, rr)
			}
		}
	}
	sameSnapshot(t, "recovering a finished recording", before, snapshot(t, parent))
}

// openForKill makes a recorder with a recording open on the blocks of f
// (CheckpointInterval one hour: checkpoints only when the test asks).
func openForKill(t *testing.T, f *feed) *Recorder {
	t.Helper()
	rec, err := NewRecorder(Config{Stream: f.stream, EventChannels: []EventChannel{pythonChannel}, CheckpointInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	return rec
}

func consumeBlocks(t *testing.T, rec *Recorder, blocks []*pipeline.Block) {
	t.Helper()
	for _, b := range blocks {
		if err := rec.Consume(b); err != nil {
			t.Fatal(err)
		}
	}
}

func checkpointNow(t *testing.T, rec *Recorder) {
	t.Helper()
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if err := rec.checkpoint(); err != nil {
		t.Fatal(err)
	}
}

// killRecorder does what SIGKILL does to a recorder: its files are closed
// by the kernel with whatever was written, nothing more.
func killRecorder(rec *Recorder) {
	rec.mu.Lock()
	if rec.rec != nil {
		rec.rec.abandon()
		rec.rec = nil
	}
	rec.ended = true
	stop, done := rec.tickStop, rec.tickDone
	rec.mu.Unlock()
	if stop != nil {
		close(stop)
		<-done
	}
}

// writeRows writes the first n buffered records of w straight to its file,
// as a write cut short by a kill leaves them.
func writeRows(t *testing.T, w *recordFile, n int) {
	t.Helper()
	if w.f == nil {
		if err := w.create(); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := w.f.Write(w.buf[:n*w.recordSize]); err != nil {
		t.Fatal(err)
	}
}

func findChange(rep *RecoveryReport, suffix string) *FileChange {
	for _, rr := range rep.Recordings {
		for i := range rr.Changes {
			if strings.HasSuffix(rr.Changes[i].Path, suffix) {
				return &rr.Changes[i]
			}
		}
	}
	return nil
}

// TestRecoverKilledMidWrite leaves a recording as a kill in the middle of
// a write does: the .npy headers at the last checkpoint (300 samples),
// continuous.dat and sample_numbers.npy written to 600 samples, then half
// a frame; timestamps.npy written to 450; TTL files of different lengths;
// MessageCenter rows without their text; a temporary structure.oebin.
// Recovery keeps the 450 samples all three files hold, cuts each event
// folder to its shortest file, and neo reads exactly that.
func TestRecoverKilledMidWrite(t *testing.T) {
	parent := t.TempDir()
	s := NewSession(parent, 0, nil)
	r, _ := s.Next()
	mk := func(blocks int) *feed {
		return makeFeed([]span{{rec: r, exp: 1, first: 0, blocks: blocks, unknownAt: -1,
			python:   map[int64]pipeline.Event{60: pyEvent(60, 0, true), 120: pyEvent(120, 0, false), 330: pyEvent(330, 1, true)},
			messages: map[int64]string{10: "before the checkpoint", 200: "also before", 310: "after it"}}})
	}
	f := mk(20)
	rec := openForKill(t, f)
	consumeBlocks(t, rec, f.blocks[:10])
	checkpointNow(t, rec)
	consumeBlocks(t, rec, f.blocks[10:])

	rec.mu.Lock()
	o := rec.rec
	cs := o.streams[0]
	if err := cs.dat.flush(); err != nil {
		t.Fatal(err)
	}
	if err := cs.sn.flush(); err != nil {
		t.Fatal(err)
	}
	writeRows(t, cs.ts, 150) // 300 + 150 rows
	if _, err := cs.dat.f.Write([]byte{1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	src := o.ttl[0]
	ttlOnDisk := src.sn.onDisk
	for _, w := range []*recordFile{src.states, src.sn, src.ts} {
		if err := w.flush(); err != nil {
			t.Fatal(err)
		}
	}
	writeRows(t, src.words, 1)
	if _, err := src.words.f.Write([]byte{9, 9, 9}); err != nil { // and a partial row
		t.Fatal(err)
	}
	for _, w := range []*recordFile{o.msgs.sn, o.msgs.ts} {
		if err := w.flush(); err != nil {
			t.Fatal(err)
		}
	}
	dir := o.dir
	rec.mu.Unlock()
	killRecorder(rec)
	if err := os.WriteFile(filepath.Join(dir, "structure.oebin.tmp"), []byte(`{"GUI version": "1.0.1", "contin`), 0o644); err != nil {
		t.Fatal(err)
	}
	if !fileExists(filepath.Join(dir, UnfinishedMarker)) {
		t.Fatal("no marker in the killed recording")
	}

	rep := mustRecover(t, parent)
	t.Logf("recovery report:\n%s", rep)
	if len(rep.Recordings) != 1 || !rep.Recordings[0].Unfinished {
		t.Fatalf("report: %s", rep)
	}
	if fileExists(filepath.Join(dir, UnfinishedMarker)) || fileExists(filepath.Join(dir, "structure.oebin.tmp")) {
		t.Error("the marker or the temporary file is still there")
	}
	folder := "continuous/Simulated_Headstage-100.sim/"
	if c := findChange(rep, folder+"continuous.dat"); c == nil || c.RecordsDropped != 150 || c.BytesDropped != 150*8+3 {
		t.Errorf("continuous.dat change %+v, want 150 frames and 3 bytes dropped", c)
	}
	if c := findChange(rep, folder+"sample_numbers.npy"); c == nil || c.RecordsDropped != 150 || !strings.Contains(c.What, "header said 300 rows, now 450") {
		t.Errorf("sample_numbers.npy change %+v", c)
	}
	if c := findChange(rep, folder+"timestamps.npy"); c == nil || c.RecordsDropped != 0 || !strings.Contains(c.What, "header said 300 rows, now 450") {
		t.Errorf("timestamps.npy change %+v", c)
	}
	if c := findChange(rep, "structure.oebin"); c != nil {
		t.Errorf("structure.oebin changed (%s): it already listed every channel with events", c.What)
	}

	want := mk(15)
	v := readWithNeo(t, r.Dir, want)
	seg := v.Segments["1/1"]
	if sv := seg.Streams["sim"]; sv.Size != 450 || sv.Mismatches != 0 {
		t.Errorf("neo reads %d samples (%d wrong), want 450", sv.Size, sv.Mismatches)
	}
	rp := "Record Node 101/experiment1/recording1/"
	for _, name := range []string{"sample_numbers.npy", "timestamps.npy"} {
		if sh := v.Files[rp+folder+name].Shape; len(sh) != 1 || sh[0] != 450 {
			t.Errorf("%s shape %v, want (450,)", name, sh)
		}
	}
	m := int(ttlOnDisk) + 1
	states, sns, words := ttlView(f.events["1/1"], 100)
	ttlDir := rp + "events/Simulated_Headstage-100.sim/TTL/"
	for name, wantVals := range map[string][]float64{"states.npy": states[:m], "sample_numbers.npy": sns[:m], "full_words.npy": words[:m]} {
		if got := anyFloats(v.Files[ttlDir+name].Values); !floatsEqual(got, wantVals) {
			t.Errorf("TTL %s = %v, want %v", name, got, wantVals)
		}
	}
	if sh := v.Files[ttlDir+"timestamps.npy"].Shape; len(sh) != 1 || sh[0] != m {
		t.Errorf("TTL timestamps shape %v, want (%d,)", sh, m)
	}
	if got := anyFloats(v.Files[rp+"events/Python_Processor-101.sim/TTL/sample_numbers.npy"].Values); !floatsEqual(got, []float64{60, 120}) {
		t.Errorf("Python events %v, want [60 120]", got)
	}
	if msg := seg.Events["Messages"]; strings.Join(msg.Labels, "|") != "before the checkpoint|also before" {
		t.Errorf("messages %q", msg.Labels)
	}
	if sh := v.Files[rp+"events/MessageCenter/sample_numbers.npy"].Shape; len(sh) != 1 || sh[0] != 2 {
		t.Errorf("MessageCenter sample_numbers shape %v, want (2,)", sh)
	}

	// Idempotent.
	before := snapshot(t, parent)
	again := mustRecover(t, parent)
	if again.Changed() || again.Recordings[0].Unfinished {
		t.Errorf("second recovery:\n%s", again)
	}
	sameSnapshot(t, "second recovery", before, snapshot(t, parent))
}

// TestRecoverBeforeFirstCheckpoint kills a recording whose buffers were
// written but that never checkpointed: no structure.oebin, .npy headers
// claiming 0 rows. The marker describes the recording, so recovery writes
// a structure.oebin listing the channels that hold events.
func TestRecoverBeforeFirstCheckpoint(t *testing.T) {
	parent := t.TempDir()
	s := NewSession(parent, 0, nil)
	r, _ := s.Next()
	f := makeFeed([]span{{rec: r, exp: 1, first: 0, blocks: 8, unknownAt: -1,
		python: map[int64]pipeline.Event{60: pyEvent(60, 0, true)}}})
	rec := openForKill(t, f)
	consumeBlocks(t, rec, f.blocks)
	rec.mu.Lock()
	o := rec.rec
	for _, w := range o.all {
		if err := w.flush(); err != nil {
			t.Fatal(err)
		}
	}
	dir := o.dir
	rec.mu.Unlock()
	killRecorder(rec)
	if fileExists(filepath.Join(dir, "structure.oebin")) {
		t.Fatal("structure.oebin exists before the first checkpoint")
	}

	rep := mustRecover(t, dir)
	if c := findChange(rep, "structure.oebin"); c == nil || !strings.Contains(c.What, "written from "+UnfinishedMarker) {
		t.Fatalf("structure.oebin not written from the marker:\n%s", rep)
	}
	v := readWithNeo(t, r.Dir, f)
	seg := v.Segments["1/1"]
	if sv := seg.Streams["sim"]; sv.Size != 240 || sv.Mismatches != 0 {
		t.Errorf("neo reads %d samples (%d wrong), want 240", sv.Size, sv.Mismatches)
	}
	ob := v.Files["Record Node 101/experiment1/recording1/structure.oebin"].Oebin
	var folders []string
	for _, e := range ob.Events {
		folders = append(folders, e.FolderName)
	}
	if strings.Join(folders, ",") != "Python_Processor-101.sim/TTL/,Simulated_Headstage-100.sim/TTL/" {
		t.Errorf("oebin events %v: want the Python channel then the source's, not the empty MessageCenter", folders)
	}
	// The same document the recorder writes when it finalises.
	rec2, _ := NewRecorder(Config{Stream: f.stream, EventChannels: []EventChannel{pythonChannel}})
	doc := rec2.oebinDoc([]string{"sim"}, func(int) bool { return true }, false)
	wantOebin, _ := marshalOebin(&doc)
	if got, _ := os.ReadFile(filepath.Join(dir, "structure.oebin")); !bytes.Equal(got, wantOebin) {
		t.Errorf("recovered structure.oebin:\n%s\nwant what the recorder writes:\n%s", got, wantOebin)
	}
}

// TestRecoverEmptyRecording: killed before any sample reached the disk
// (headers only): no structure.oebin (readers cannot open an empty
// stream), the marker is removed, nothing else changes.
func TestRecoverEmptyRecording(t *testing.T) {
	parent := t.TempDir()
	s := NewSession(parent, 0, nil)
	r, _ := s.Next()
	f := makeFeed([]span{{rec: r, exp: 1, first: 0, blocks: 2, unknownAt: -1}})
	rec := openForKill(t, f)
	consumeBlocks(t, rec, f.blocks)
	killRecorder(rec)
	dir := RecordingPath(r, 101)
	rep := mustRecover(t, parent)
	rr := rep.Recordings[0]
	if !rr.Unfinished || rep.Changed() || len(rr.Warnings) != 1 || !strings.Contains(rr.Warnings[0], "no sample reached the disk") {
		t.Fatalf("report:\n%s", rep)
	}
	if fileExists(filepath.Join(dir, UnfinishedMarker)) || fileExists(filepath.Join(dir, "structure.oebin")) {
		t.Error("marker or structure.oebin left in an empty recording")
	}
}

// TestRecoverPowerCut: a power cut can leave blocks the disk never got as
// zeros below the file size, even below what a header claims. Recovery
// drops the rows from the first sample number that does not increase.
func TestRecoverPowerCut(t *testing.T) {
	parent := t.TempDir()
	s := NewSession(parent, 0, nil)
	r, _ := s.Next()
	f := makeFeed([]span{{rec: r, exp: 1, first: 0, blocks: 10, unknownAt: -1}})
	record(t, Config{Stream: f.stream}, f)
	dir := filepath.Join(RecordingPath(r, 101), "continuous", "Simulated_Headstage-100.sim")
	appendZeros := func(name string, n int) {
		w, err := os.OpenFile(filepath.Join(dir, name), os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			t.Fatal(err)
		}
		w.Write(make([]byte, n))
		w.Close()
	}
	appendZeros("continuous.dat", 60*8)
	appendZeros("sample_numbers.npy", 60*8)
	appendZeros("timestamps.npy", 60*8)
	for _, name := range []string{"sample_numbers.npy", "timestamps.npy"} {
		p := filepath.Join(dir, name)
		nf, err := openNpy(p, "")
		if err != nil {
			t.Fatal(err)
		}
		if err := rewriteNpyHeader(nf, 360); err != nil { // the header reached the disk, the data did not
			t.Fatal(err)
		}
	}
	rep := mustRecover(t, parent)
	if c := findChange(rep, "continuous.dat"); c == nil || c.RecordsDropped != 60 || !strings.Contains(c.What, "does not increase") {
		t.Fatalf("report:\n%s", rep)
	}
	v := readWithNeo(t, r.Dir, f)
	if sv := v.Segments["1/1"].Streams["sim"]; sv.Size != 300 || sv.Mismatches != 0 {
		t.Errorf("neo reads %d samples (%d wrong), want 300", sv.Size, sv.Mismatches)
	}

	// An unfinished recording written with FsyncCheckpoint, found after a
	// restart of the machine: what is under the header count was synced;
	// past it, rows the disk never got read as zeros.
	r2, _ := s.Next()
	f2 := makeFeed([]span{{rec: r2, exp: 1, first: 0, blocks: 15, unknownAt: -1}})
	rec, err := NewRecorder(Config{Stream: f2.stream, CheckpointInterval: time.Hour, Fsync: FsyncCheckpoint})
	if err != nil {
		t.Fatal(err)
	}
	consumeBlocks(t, rec, f2.blocks[:10])
	checkpointNow(t, rec)
	consumeBlocks(t, rec, f2.blocks[10:])
	rec.mu.Lock()
	for _, w := range rec.rec.all {
		if err := w.flush(); err != nil {
			t.Fatal(err)
		}
	}
	rec.mu.Unlock()
	killRecorder(rec)
	d2 := RecordingPath(r2, 101)
	cont := filepath.Join(d2, "continuous", "Simulated_Headstage-100.sim")
	for _, name := range []string{"sample_numbers.npy", "timestamps.npy"} {
		w, err := os.OpenFile(filepath.Join(cont, name), os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		w.WriteAt(make([]byte, 60*8), int64(npyHeaderSize("<i8"))+390*8) // rows 390–449
		w.Close()
	}
	mp := filepath.Join(d2, UnfinishedMarker)
	data, _ := os.ReadFile(mp)
	var m marker
	if err := json.Unmarshal(data, &m); err != nil || m.Fsync != "checkpoint" || m.BootID == "" {
		t.Fatalf("marker %s: %v", data, err)
	}
	m.BootID = "another-boot"
	data, _ = json.Marshal(m)
	os.WriteFile(mp, data, 0o644)
	rep = mustRecover(t, d2)
	if c := findChange(rep, "continuous.dat"); c == nil || c.RecordsDropped != 60 || !strings.Contains(c.What, "row 390 does not increase") {
		t.Fatalf("report:\n%s", rep)
	}
}

// npyFileBytes is a .npy file with a header exactly as long as its dict
// needs (numpy pads to 64 bytes; other writers may not).
func npyFileBytes(descr string, shape []int64, data []byte) []byte {
	var sh []string
	for _, d := range shape {
		sh = append(sh, strconv.FormatInt(d, 10))
	}
	tuple := strings.Join(sh, ", ")
	if len(shape) == 1 {
		tuple += ","
	}
	dict := "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + tuple + "), }\n"
	out := []byte("\x93NUMPY\x01\x00")
	out = binary.LittleEndian.AppendUint16(out, uint16(len(dict)))
	out = append(out, dict...)
	return append(out, data...)
}

// TestRecoverForeignRecordingAndSpikes recovers a recording another
// writer made: structure.oebin indented by four spaces with keys ephysd
// does not write, tight .npy headers, and a spikes folder of
// multi-dimensional arrays that disagree in length. The arrays are cut to
// the shortest; structure.oebin, already right, is left as it is; a header
// too short for its new count is rewritten with room.
func TestRecoverForeignRecordingAndSpikes(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "2024-01-01_00-00-00", "Record Node 104", "experiment1", "recording1")
	cont := filepath.Join(dir, "continuous", "Acquisition_Board-100.Rhythm_Data")
	spikes := filepath.Join(dir, "spikes", "Spike_Detector-105.Rhythm_Data", "Electrode_1")
	for _, d := range []string{cont, spikes} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	oebinText := `{
    "GUI version": "0.6.7",
    "continuous": [
        {
            "folder_name": "Acquisition_Board-100.Rhythm_Data/",
            "sample_rate": 30000.0,
            "source_processor_name": "Acquisition Board",
            "source_processor_id": 100,
            "stream_name": "Rhythm_Data",
            "recorded_processor": "Acquisition Board",
            "recorded_processor_id": 100,
            "num_channels": 2,
            "channels": [
                {"channel_name": "CH1", "bit_volts": 0.195, "units": "uV"},
                {"channel_name": "CH2", "bit_volts": 0.195, "units": "uV"}
            ]
        }
    ],
    "events": [],
    "spikes": [
        {"folder": "Spike_Detector-105.Rhythm_Data/Electrode_1/", "sample_rate": 30000.0, "num_channels": 2}
    ]
}
`
	write := func(p string, data []byte) {
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(filepath.Join(dir, "structure.oebin"), []byte(oebinText))
	// 100 samples, consistent, tight headers: recovery must leave them.
	dat := make([]byte, 100*4)
	sn, ts := make([]byte, 800), make([]byte, 800)
	for i := 0; i < 100; i++ {
		binary.LittleEndian.PutUint16(dat[4*i:], uint16(i))
		binary.LittleEndian.PutUint64(sn[8*i:], uint64(1000+i))
		binary.LittleEndian.PutUint64(ts[8*i:], math.Float64bits(float64(1000+i)/30000))
	}
	write(filepath.Join(cont, "continuous.dat"), dat)
	write(filepath.Join(cont, "sample_numbers.npy"), npyFileBytes("<i8", []int64{100}, sn))
	write(filepath.Join(cont, "timestamps.npy"), npyFileBytes("<f8", []int64{100}, ts))
	// Spikes: waveforms (n, 2, 40) float32 for 12 spikes, sample numbers
	// for 14, clusters for 13, timestamps for 14 under a header claiming 1
	// — with no room for a two-digit count.
	write(filepath.Join(spikes, "waveforms.npy"), npyFileBytes("<f4", []int64{12, 2, 40}, make([]byte, 12*2*40*4)))
	write(filepath.Join(spikes, "sample_numbers.npy"), npyFileBytes("<i8", []int64{14}, make([]byte, 14*8)))
	write(filepath.Join(spikes, "clusters.npy"), npyFileBytes("<u2", []int64{13}, make([]byte, 13*2)))
	write(filepath.Join(spikes, "timestamps.npy"), npyFileBytes("<f8", []int64{1}, make([]byte, 14*8)))
	before := snapshot(t, dir)

	rep := mustRecover(t, filepath.Dir(filepath.Dir(dir)))
	t.Logf("report:\n%s", rep)
	after := snapshot(t, dir)
	for p, data := range before {
		changed := !bytes.Equal(data, after[p])
		wantChanged := strings.Contains(p, "spikes") && !strings.HasSuffix(p, "waveforms.npy")
		if changed != wantChanged {
			t.Errorf("%s changed: %v, want %v", p, changed, wantChanged)
		}
	}
	var out map[string][]int
	runPython(t, `
import sys, os, json
import numpy as np
d = sys.argv[1]
print(json.dumps({n: list(np.load(os.path.join(d, n)).shape) for n in os.listdir(d)}))
`, &out, spikes)
	want := map[string][]int{"waveforms.npy": {12, 2, 40}, "sample_numbers.npy": {12}, "clusters.npy": {12}, "timestamps.npy": {12}}
	if fmt.Sprint(out) != fmt.Sprint(want) {
		t.Errorf("numpy shapes %v, want %v", out, want)
	}
	again := mustRecover(t, dir)
	if again.Changed() {
		t.Errorf("second recovery changed:\n%s", again)
	}
}

// TestRecoverIncompleteHeader: a process killed between creating an event
// file and writing its header leaves a file shorter than a header. It
// becomes an empty array, and the channel, now without a whole event, is
// left out of structure.oebin.
func TestRecoverIncompleteHeader(t *testing.T) {
	parent := t.TempDir()
	s := NewSession(parent, 0, nil)
	r, _ := s.Next()
	f := makeFeed([]span{{rec: r, exp: 1, first: 0, blocks: 4, unknownAt: -1,
		python: map[int64]pipeline.Event{60: pyEvent(60, 0, true)}}})
	rec := openForKill(t, f)
	consumeBlocks(t, rec, f.blocks)
	checkpointNow(t, rec)
	rec.mu.Lock()
	dir := rec.rec.dir
	rec.mu.Unlock()
	killRecorder(rec)
	py := filepath.Join(dir, "events", "Python_Processor-101.sim", "TTL")
	if err := os.WriteFile(filepath.Join(py, "full_words.npy"), []byte("\x93NUMPY\x01\x00v\x00{'descr"), 0o644); err != nil {
		t.Fatal(err)
	}
	rep := mustRecover(t, dir)
	t.Logf("report:\n%s", rep)
	if c := findChange(rep, "Python_Processor-101.sim/TTL/full_words.npy"); c == nil || !strings.Contains(c.What, "incomplete header") {
		t.Fatalf("report:\n%s", rep)
	}
	if c := findChange(rep, "structure.oebin"); c == nil {
		t.Fatalf("structure.oebin still lists the Python channel:\n%s", rep)
	}
	v := readWithNeo(t, r.Dir, f)
	rp := "Record Node 101/experiment1/recording1/"
	for _, name := range []string{"states.npy", "sample_numbers.npy", "timestamps.npy", "full_words.npy"} {
		if sh := v.Files[rp+"events/Python_Processor-101.sim/TTL/"+name].Shape; len(sh) != 1 || sh[0] != 0 {
			t.Errorf("Python %s shape %v, want (0,)", name, sh)
		}
	}
	if ob := v.Files[rp+"structure.oebin"].Oebin; len(ob.Events) != 1 || ob.Events[0].FolderName != "Simulated_Headstage-100.sim/TTL/" {
		t.Errorf("oebin events %+v", ob.Events)
	}
}

// TestRecoverLeavesARunningRecordingAlone: a marker naming a process that
// still runs is a recording in progress: recovery refuses to touch it.
func TestRecoverLeavesARunningRecordingAlone(t *testing.T) {
	parent := t.TempDir()
	s := NewSession(parent, 0, nil)
	r, _ := s.Next()
	f := makeFeed([]span{{rec: r, exp: 1, first: 0, blocks: 4, unknownAt: -1}})
	rec := openForKill(t, f)
	consumeBlocks(t, rec, f.blocks)
	killRecorder(rec)
	dir := RecordingPath(r, 101)

	sleeper := exec.Command("sleep", "60")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { sleeper.Process.Kill(); sleeper.Wait() }()
	start, ok := processStartTime(sleeper.Process.Pid)
	if !ok {
		t.Fatal("no start time for the child")
	}
	m := marker{Note: markerNote, PID: sleeper.Process.Pid, BootID: currentBootID(), ProcessStart: start, Oebin: []byte(`{"continuous": []}`)}
	data, _ := json.Marshal(m)
	if err := os.WriteFile(filepath.Join(dir, UnfinishedMarker), data, 0o644); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, parent)
	for _, recover := range []func(string) (*RecoveryReport, error){Recover, RecoverUnfinished} {
		rep, err := recover(parent)
		if err != nil {
			t.Fatal(err)
		}
		if e := rep.Err(); e == nil || !strings.Contains(e.Error(), fmt.Sprintf("process %d, which is still running", sleeper.Process.Pid)) {
			t.Errorf("recovering a recording in progress: %v", e)
		}
	}
	sameSnapshot(t, "recovering a recording in progress", before, snapshot(t, parent))
	// Once the process is gone (same pid, another start time would be
	// another process), the recording is recovered.
	m.ProcessStart = start + 1
	data, _ = json.Marshal(m)
	os.WriteFile(filepath.Join(dir, UnfinishedMarker), data, 0o644)
	rep, err := RecoverUnfinished(parent)
	if err != nil || rep.Err() != nil || len(rep.Recordings) != 1 {
		t.Fatalf("%v %v %s", err, rep.Err(), rep)
	}
}

// TestRecoverErrors: what recovery cannot do is said, with where and what
// to do.
func TestRecoverErrors(t *testing.T) {
	empty := t.TempDir()
	if _, err := Recover(empty); err == nil || !strings.Contains(err.Error(), "no recording folder") {
		t.Errorf("a folder without recordings: %v", err)
	}
	if _, err := Recover(filepath.Join(empty, "missing")); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("a missing folder: %v", err)
	}
	if rep, err := RecoverUnfinished(filepath.Join(empty, "missing")); err != nil || len(rep.Recordings) != 0 {
		t.Errorf("RecoverUnfinished of a missing root: %v %v", rep, err)
	}

	// Samples without anything that says how many channels they have.
	parent := t.TempDir()
	s := NewSession(parent, 0, nil)
	r, _ := s.Next()
	f := makeFeed([]span{{rec: r, exp: 1, first: 0, blocks: 4, unknownAt: -1}})
	record(t, Config{Stream: f.stream}, f)
	dir := RecordingPath(r, 101)
	os.Remove(filepath.Join(dir, "structure.oebin"))
	rep := mustRecoverErr(t, parent)
	if e := rep.Err(); !strings.Contains(e.Error(), "channel count of continuous.dat is unknown") || !strings.Contains(e.Error(), dir) {
		t.Errorf("no structure.oebin: %v", e)
	}
	if !strings.Contains(rep.String(), "NOT FIXED") {
		t.Errorf("report does not say it: %s", rep)
	}
	os.WriteFile(filepath.Join(dir, "structure.oebin"), []byte("{not json"), 0o644)
	if e := mustRecoverErr(t, parent).Err(); !strings.Contains(e.Error(), "structure.oebin: not valid JSON") {
		t.Errorf("broken structure.oebin: %v", e)
	}
	// A .npy file recovery cannot parse.
	record(t, Config{Stream: f.stream}, makeFeed([]span{{rec: func() *pipeline.Recording { r, _ := s.Next(); return r }(), exp: 1, blocks: 2, unknownAt: -1}}))
	bad := filepath.Join(RecordingPath(&pipeline.Recording{Dir: r.Dir, Experiment: 1, Number: 2}, 101), "continuous", "Simulated_Headstage-100.sim", "timestamps.npy")
	os.WriteFile(bad, bytes.Repeat([]byte("x"), 500), 0o644)
	if e := mustRecoverErr(t, parent).Err(); !strings.Contains(e.Error(), bad) || !strings.Contains(e.Error(), "no .npy magic") {
		t.Errorf("garbage .npy: %v", e)
	}
}

func mustRecoverErr(t *testing.T, dir string) *RecoveryReport {
	t.Helper()
	rep, err := Recover(dir)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Err() == nil {
		t.Fatalf("recover %s succeeded:\n%s", dir, rep)
	}
	return rep
}
