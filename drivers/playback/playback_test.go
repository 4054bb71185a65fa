package playback

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/pipeline"
)

// fixtures is the folder testdata/make_recordings.py wrote, or "" with
// fixtureErr saying why there is none.
var fixtures string
var fixtureErr error

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "playback-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// Always the system python: a pyenv python3 first on PATH lacks numpy.
	out, err := exec.Command("/usr/bin/python3", "-I", "testdata/make_recordings.py", dir).CombinedOutput()
	if err != nil {
		fixtureErr = fmt.Errorf("building fixtures with /usr/bin/python3 and numpy: %v\n%s", err, out)
	} else {
		fixtures = dir
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func fixture(t *testing.T, rel ...string) string {
	t.Helper()
	if fixtures == "" {
		t.Skip(fixtureErr)
	}
	return filepath.Join(append([]string{fixtures}, rel...)...)
}

const guiRec = "session/2024-01-01_10-00-00/Record Node 101/experiment1/recording1"

func newBlock(t testing.TB, channels, samples int) *pipeline.Block {
	t.Helper()
	p, err := pipeline.NewPool(1, channels, samples)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close(false) })
	return p.TryGet()
}

func open(t testing.TB, cfg Config) *Source {
	t.Helper()
	s, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// played is everything a source delivered.
type played struct {
	firsts, lengths []int64
	data            [][]float32 // per channel
	samples         []int64
	words           []uint64
}

func playAll(t testing.TB, s *Source, blockLen int) played {
	t.Helper()
	b := newBlock(t, s.nch, blockLen)
	p := played{data: make([][]float32, s.nch)}
	for {
		b.Reset()
		err := s.ReadBlock(b)
		if errors.Is(err, io.EOF) {
			return p
		}
		if err != nil {
			t.Fatal(err)
		}
		if b.Samples < 1 || b.Samples > blockLen {
			t.Fatalf("block of %d samples", b.Samples)
		}
		p.firsts = append(p.firsts, b.FirstSample)
		p.lengths = append(p.lengths, int64(b.Samples))
		for c := range p.data {
			p.data[c] = append(p.data[c], b.Channel(c)...)
		}
		for i := 0; i < b.Samples; i++ {
			p.samples = append(p.samples, b.FirstSample+int64(i))
		}
		p.words = append(p.words, b.Digital[:b.Samples]...)
	}
}

func readNpy(t *testing.T, path string) *npyArray {
	t.Helper()
	a, err := openNpy(path, false)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func npyFloat32(t *testing.T, path string) []float32 {
	a := readNpy(t, path)
	if a.descr != "<f4" {
		t.Fatalf("%s: %s", path, a.descr)
	}
	out := make([]float32, a.count)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(a.data[i*4:]))
	}
	return out
}

func npyInts(t *testing.T, path string) []int64 {
	v, err := readNpy(t, path).ints()
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// checkAgainstExpected compares what was played with the expected_*.npy
// files the fixture script wrote: every value bit for bit.
func checkAgainstExpected(t *testing.T, rec string, p played, prefix string) {
	t.Helper()
	data := npyFloat32(t, filepath.Join(rec, "expected_"+prefix+"data.npy"))
	words := npyInts(t, filepath.Join(rec, "expected_"+prefix+"words.npy"))
	n := len(words)
	if len(p.words) != n || len(data) != n*len(p.data) {
		t.Fatalf("played %d samples, want %d", len(p.words), n)
	}
	if prefix == "" {
		sn := npyInts(t, filepath.Join(rec, "expected_sample_numbers.npy"))
		for i := range sn {
			if p.samples[i] != sn[i] {
				t.Fatalf("sample %d: sample number %d, want %d", i, p.samples[i], sn[i])
			}
		}
	}
	for c := range p.data {
		for i := 0; i < n; i++ {
			if got, want := p.data[c][i], data[c*n+i]; math.Float32bits(got) != math.Float32bits(want) {
				t.Fatalf("channel %d sample %d = %v, want %v", c, i, got, want)
			}
		}
	}
	for i := range words {
		if p.words[i] != uint64(words[i]) {
			t.Fatalf("sample %d (number %d): digital word %#x, want %#x", i, p.samples[i], p.words[i], words[i])
		}
	}
}

func TestRegistered(t *testing.T) {
	cfg, err := drivers.NewSourceConfig("playback")
	if err != nil {
		t.Fatal(err)
	}
	c, ok := cfg.(*Config)
	if !ok || !c.Realtime || c.Path != "" || c.Stream != "" {
		t.Fatalf("default config %#v", cfg)
	}
	if _, err := c.Open(); err == nil || !strings.Contains(err.Error(), "path is not set") {
		t.Fatalf("empty path: %v", err)
	}
}

func TestGUIRecordingFromSessionFolder(t *testing.T) {
	session := fixture(t, "session")
	s := open(t, Config{Path: session})
	rec := fixture(t, guiRec)
	if s.Dir() != rec {
		t.Fatalf("playing %s, want %s", s.Dir(), rec)
	}
	info := s.Info()
	if info.ProcessorName != "Acquisition Board" || info.ProcessorID != 100 || info.StreamName != "Rhythm_Data" ||
		info.SampleRate != 30000 || info.TTLChannelName != "Rhythm Data TTL Input" || info.TTLLines != 8 {
		t.Fatalf("info %+v", info)
	}
	ch := func(name, units string, bv float64) pipeline.ChannelInfo {
		return pipeline.ChannelInfo{Name: name, Units: units, BitVolts: bv, Description: "a channel"}
	}
	wantCh := []pipeline.ChannelInfo{
		ch("CH1", "uV", 0.195), ch("CH2", "uV", 0.195), ch("CH3", "uV", 0.195),
		ch("ADC1", "V", 0.00015258789), ch("ADC2", "V", 0.00015258789),
	}
	if fmt.Sprint(info.Channels) != fmt.Sprint(wantCh) {
		t.Fatalf("channels %+v", info.Channels)
	}

	p := playAll(t, s, 1000)
	// 2500 samples from 123456, a gap of 777, 2600 samples: blocks end at
	// the gap and the next one starts at the new sample number.
	g := int64(123456 + 2500 + 777)
	wantFirst := []int64{123456, 124456, 125456, g, g + 1000, g + 2000}
	wantLen := []int64{1000, 1000, 500, 1000, 1000, 600}
	if fmt.Sprint(p.firsts, p.lengths) != fmt.Sprint(wantFirst, wantLen) {
		t.Fatalf("blocks start at %v with %v samples, want %v with %v", p.firsts, p.lengths, wantFirst, wantLen)
	}
	checkAgainstExpected(t, rec, p, "")
	// int16 extremes of the first sample.
	if p.data[0][0] != float32(-32768*0.195) || p.data[1][0] != float32(32767*0.195) || p.data[4][0] != float32(-0.00015258789) {
		t.Fatalf("first sample %v %v %v", p.data[0][0], p.data[1][0], p.data[4][0])
	}

	// Other block lengths cut the same stream the same way.
	s2 := open(t, Config{Path: rec})
	p2 := playAll(t, s2, 777)
	checkAgainstExpected(t, rec, p2, "")
	for i, l := range p2.lengths {
		if end := p2.firsts[i] + l; end != 123456+2500 && end != g+2600 && l != 777 {
			t.Fatalf("block %d: %d samples from %d", i, l, p2.firsts[i])
		}
	}
}

func TestOtherStream(t *testing.T) {
	rec := fixture(t, guiRec)
	for _, name := range []string{"PXI-6255", "NI-DAQmx-102.PXI-6255", "NI-DAQmx-102.PXI-6255/"} {
		s := open(t, Config{Path: rec, Stream: name})
		info := s.Info()
		if info.ProcessorName != "NI-DAQmx" || info.ProcessorID != 102 || info.SampleRate != 40000 || len(info.Channels) != 2 ||
			info.TTLChannelName != "NI TTL" || info.TTLLines != 3 {
			t.Fatalf("%s: info %+v", name, info)
		}
		p := playAll(t, s, 128)
		if p.firsts[0] != 1000 {
			t.Fatalf("first sample %d", p.firsts[0])
		}
		checkAgainstExpected(t, rec, p, "ni_")
	}
	s := open(t, Config{Path: rec, Stream: "Rhythm_Data"})
	if s.Info().ProcessorID != 100 {
		t.Fatal("stream by stream name")
	}
	_, err := Open(Config{Path: rec, Stream: "x"})
	want := `playback: ` + filepath.Join(rec, "structure.oebin") + `: no continuous stream named "x" (streams: Acquisition_Board-100.Rhythm_Data, NI-DAQmx-102.PXI-6255)`
	if err == nil || err.Error() != want {
		t.Fatalf("error %v\nwant  %s", err, want)
	}
}

func TestPickRecording(t *testing.T) {
	multi := fixture(t, "multi")
	_, err := Open(Config{Path: multi})
	want := "holds 4 recordings; set path to one of them: " +
		"Record Node 102/experiment1/recording1, Record Node 102/experiment1/recording2, " +
		"Record Node 102/experiment1/recording10, Record Node 102/experiment2/recording1"
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("ambiguous folder: %v\nwant …%s", err, want)
	}
	// The experiment folder alone is still ambiguous; a recording is not.
	if _, err := Open(Config{Path: filepath.Join(multi, "Record Node 102", "experiment1")}); err == nil || !strings.Contains(err.Error(), "holds 3 recordings") {
		t.Fatalf("experiment folder: %v", err)
	}
	rec := filepath.Join(multi, "Record Node 102", "experiment2")
	s := open(t, Config{Path: rec})
	p := playAll(t, s, 4096)
	checkAgainstExpected(t, filepath.Join(rec, "recording1"), p, "")
	// The structure.oebin file itself names its recording.
	s = open(t, Config{Path: filepath.Join(rec, "recording1", "structure.oebin")})
	if s.Dir() != filepath.Join(rec, "recording1") {
		t.Fatal(s.Dir())
	}
	if _, err := Open(Config{Path: filepath.Join(multi, "nope")}); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("missing path: %v", err)
	}
	empty := t.TempDir()
	if _, err := Open(Config{Path: empty}); err == nil || !strings.Contains(err.Error(), "no recording found") {
		t.Fatalf("empty folder: %v", err)
	}
}

func TestOldLayout(t *testing.T) {
	rec := fixture(t, "old", "recording1")
	s := open(t, Config{Path: rec})
	info := s.Info()
	if info.StreamName != "0" || info.ProcessorName != "Rhythm FPGA" || info.TTLLines != 5 {
		t.Fatalf("info %+v", info)
	}
	p := playAll(t, s, 256)
	checkAgainstExpected(t, rec, p, "")
}

// TestRecordingErrors breaks a copy of the GUI recording in various ways.
func TestRecordingErrors(t *testing.T) {
	src := fixture(t, guiRec)
	cases := []struct {
		name  string
		file  string // relative to the recording
		write func(old []byte) []byte
		want  string
	}{
		{"oebin not JSON", "structure.oebin", func(b []byte) []byte { return b[:len(b)/2] }, "structure.oebin: not valid JSON"},
		{"oebin wrong type", "structure.oebin", func([]byte) []byte { return []byte(`{"continuous": 3}`) }, "structure.oebin: unexpected content"},
		{"oebin no streams", "structure.oebin", func([]byte) []byte { return []byte(`{"GUI version": "1.0.0", "continuous": []}`) }, "no continuous streams"},
		{"bad magic", "continuous/Acquisition_Board-100.Rhythm_Data/sample_numbers.npy", func(b []byte) []byte { return append([]byte("XNUMPY"), b[6:]...) }, "not a .npy file"},
		{"npy version", "continuous/Acquisition_Board-100.Rhythm_Data/sample_numbers.npy", func(b []byte) []byte { b[6] = 4; return b }, "format version 4.0 is not supported"},
		{"big endian", "continuous/Acquisition_Board-100.Rhythm_Data/sample_numbers.npy", replace("'<i8'", "'>i8'"), `">i8" is big-endian`},
		{"fortran", "continuous/Acquisition_Board-100.Rhythm_Data/sample_numbers.npy", replace("False", "True "), "Fortran-ordered"},
		{"garbage header", "continuous/Acquisition_Board-100.Rhythm_Data/sample_numbers.npy", replace("'shape': (", "'shape': #"), "malformed .npy header"},
		{"2-d", "continuous/Acquisition_Board-100.Rhythm_Data/sample_numbers.npy", replace("(5100,)", "(51,100)"), "only one-dimensional"},
		{"truncated", "continuous/Acquisition_Board-100.Rhythm_Data/sample_numbers.npy", func(b []byte) []byte { return b[:len(b)-8] }, "truncated: the header says 5100 values of 8 bytes"},
		{"header length", "continuous/Acquisition_Board-100.Rhythm_Data/sample_numbers.npy", func(b []byte) []byte { return b[:100] }, "runs past the end"},
		{"float sample numbers", "continuous/Acquisition_Board-100.Rhythm_Data/sample_numbers.npy", replace("'<i8'", "'<f8'"), "holds <f8 values, not integer sample numbers"},
		{"missing sample numbers", "continuous/Acquisition_Board-100.Rhythm_Data/sample_numbers.npy", nil, `sample_numbers.npy is missing (structure.oebin has GUI version "0.6.7"`},
		{"missing dat", "continuous/Acquisition_Board-100.Rhythm_Data/continuous.dat", nil, "continuous.dat is missing"},
		{"bad state", "events/Acquisition_Board-100.Rhythm_Data/TTL/states.npy", func(b []byte) []byte { b[len(b)-2] = 100; return b }, "event 11 has state 100"},
		{"empty npy", "events/Acquisition_Board-100.Rhythm_Data/TTL/sample_numbers.npy", func([]byte) []byte { return nil }, "not a .npy file"},
		{"bit_volts", "structure.oebin", replace(`"bit_volts": 0.195`, `"bit_volts": -1.00`), "channel 1 (CH1) has bit_volts -1"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rec := filepath.Join(t.TempDir(), "recording1")
			copyDir(t, src, rec)
			path := filepath.Join(rec, tc.file)
			if tc.write == nil {
				os.Remove(path)
			} else {
				old, err := os.ReadFile(path)
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, tc.write(old), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			_, err := Open(Config{Path: rec})
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "playback: ") {
				t.Fatalf("error %v\nwant one containing %q", err, tc.want)
			}
		})
	}
}

func replace(old, new string) func([]byte) []byte {
	return func(b []byte) []byte {
		s := string(b)
		if !strings.Contains(s, old) {
			panic("fixture lacks " + old)
		}
		return []byte(strings.Replace(s, old, new, 1))
	}
}

func copyDir(t *testing.T, from, to string) {
	t.Helper()
	err := filepath.Walk(from, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(from, p)
		if fi.IsDir() {
			return os.MkdirAll(filepath.Join(to, rel), 0o755)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(to, rel), b, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestNpyHeaders(t *testing.T) {
	hdr := func(major byte, dict string) []byte {
		b := []byte(npyMagic)
		b = append(b, major, 0)
		if major == 1 {
			b = binary.LittleEndian.AppendUint16(b, uint16(len(dict)))
		} else {
			b = binary.LittleEndian.AppendUint32(b, uint32(len(dict)))
		}
		return append(b, dict...)
	}
	ok := []struct {
		buf   []byte
		descr string
		count int
	}{
		{append(hdr(1, "{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }\n"), make([]byte, 16)...), "<i8", 2},
		{append(hdr(2, `{"descr": "<u8", "fortran_order": False, "shape": (1,)}`), make([]byte, 8)...), "<u8", 1},
		{append(hdr(3, "{'shape': (3, 1), 'fortran_order': False, 'descr': '<i4'}"), make([]byte, 12)...), "<i4", 3},
		{append(hdr(1, "{'descr': '|S4', 'fortran_order': False, 'shape': (2L,), }"), make([]byte, 8)...), "|S4", 2},
		{hdr(1, "{'descr': '<f8', 'fortran_order': False, 'shape': (0,), }"), "<f8", 0},
		{append(hdr(1, "{'descr': '|i1', 'fortran_order': False, 'shape': (), }"), 0xff), "|i1", 1},
	}
	for _, c := range ok {
		a, err := parseNpy("x.npy", c.buf)
		if err != nil || a.descr != c.descr || a.count != c.count {
			t.Errorf("%q: %v %+v", c.buf, err, a)
		}
	}
	a, _ := parseNpy("x.npy", ok[5].buf)
	if a.int64At(0) != -1 {
		t.Error("int8")
	}
	bad := []struct {
		buf  []byte
		want string
	}{
		{[]byte("\x93NUMPY"), "not a .npy file"},
		{hdr(1, "{'descr': '<c16', 'fortran_order': False, 'shape': (1,), }"), `dtype "<c16" is not supported`},
		{hdr(1, "{'descr': [('a', '<i4')], 'fortran_order': False, 'shape': (1,), }"), "structured .npy arrays"},
		{hdr(1, "{'descr': '<i8', 'shape': (1,), }"), "no 'fortran_order'"},
		{hdr(1, "{'descr': '<i8', 'fortran_order': False}"), "no 'shape'"},
		{hdr(1, "{'descr': '<i8', 'fortran_order': False, 'shape': (-1,)}"), "not a non-negative integer"},
		{hdr(1, "{'descr': '<i8' 'fortran_order': False}"), "expected ',' or '}'"},
		{hdr(1, "{'descr': '<i8', 'fortran_order': False, 'shape': (1,), } x"), "after the dict"},
		{hdr(1, "{'descr: '<i8'}"), "malformed"},
		{hdr(1, "['descr']"), "not a dict"},
		{hdr(1, "{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }"), "truncated"},
		{hdr(2, "{}")[:11], "truncated .npy header"},
		{hdr(1, "{'descr': '<i8', 'fortran_order': False, 'shape': (4000000000000000000,)}"), "truncated: the header says shape"},
	}
	for _, c := range bad {
		_, err := parseNpy("x.npy", c.buf)
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.HasPrefix(err.Error(), "x.npy: ") {
			t.Errorf("%q: error %v, want %q", c.buf, err, c.want)
		}
	}
}

// writeNpy writes a version 1.0 .npy file of one-dimensional data.
func writeNpy(t testing.TB, path, descr string, n int, data []byte) {
	t.Helper()
	dict := fmt.Sprintf("{'descr': '%s', 'fortran_order': False, 'shape': (%d,), }", descr, n)
	pad := 64 - (10+len(dict)+1)%64
	dict += strings.Repeat(" ", pad%64) + "\n"
	b := append([]byte(npyMagic), 1, 0)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(dict)))
	b = append(b, dict...)
	b = append(b, data...)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// writeRecording writes an ephysd-style recording from Go: nch channels of
// a ramp, samples sample numbers from 0, TTL line 0 toggling every 100
// samples.
func writeRecording(t testing.TB, dir string, nch, samples int, rate float64) string {
	t.Helper()
	rec := filepath.Join(dir, "recording1")
	stream := "Simulated_Headstage-100.sim"
	cdir := filepath.Join(rec, "continuous", stream)
	dat := make([]byte, 0, nch*samples*2)
	sn := make([]byte, 0, samples*8)
	for i := 0; i < samples; i++ {
		for c := 0; c < nch; c++ {
			dat = binary.LittleEndian.AppendUint16(dat, uint16(int16(i+c)))
		}
		sn = binary.LittleEndian.AppendUint64(sn, uint64(i))
	}
	if err := os.MkdirAll(cdir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(cdir, "continuous.dat"), dat, 0o644); err != nil {
		t.Fatal(err)
	}
	writeNpy(t, filepath.Join(cdir, "sample_numbers.npy"), "<i8", samples, sn)
	var st, es []byte
	nev := 0
	for i := 100; i < samples; i += 100 {
		state := int16(1)
		if nev%2 == 1 {
			state = -1
		}
		st = binary.LittleEndian.AppendUint16(st, uint16(state))
		es = binary.LittleEndian.AppendUint64(es, uint64(i))
		nev++
	}
	edir := filepath.Join(rec, "events", stream, "TTL")
	writeNpy(t, filepath.Join(edir, "states.npy"), "<i2", nev, st)
	writeNpy(t, filepath.Join(edir, "sample_numbers.npy"), "<i8", nev, es)
	var chans []string
	for c := 0; c < nch; c++ {
		chans = append(chans, fmt.Sprintf(`{"channel_name": "CH%d", "bit_volts": 0.195, "units": "uV"}`, c+1))
	}
	oebin := fmt.Sprintf(`{"GUI version": "1.0.1", "continuous": [{"folder_name": "%s/", "sample_rate": %g,
 "source_processor_name": "Simulated Headstage", "source_processor_id": 100, "stream_name": "sim",
 "num_channels": %d, "channels": [%s]}],
 "events": [{"folder_name": "%s/TTL/", "channel_name": "TTL Input", "type": "int16", "initial_state": 0}]}`,
		stream, rate, nch, strings.Join(chans, ","), stream)
	if err := os.WriteFile(filepath.Join(rec, "structure.oebin"), []byte(oebin), 0o644); err != nil {
		t.Fatal(err)
	}
	return rec
}

func TestGoWrittenRecording(t *testing.T) {
	rec := writeRecording(t, t.TempDir(), 7, 1234, 30000)
	s := open(t, Config{Path: rec})
	if s.Info().TTLLines != 1 || s.Info().StreamName != "sim" {
		t.Fatalf("info %+v", s.Info())
	}
	p := playAll(t, s, 500)
	if len(p.words) != 1234 {
		t.Fatalf("%d samples", len(p.words))
	}
	for i := range p.words {
		for c := 0; c < 7; c++ {
			if want := float32(float64(int16(i+c)) * 0.195); p.data[c][i] != want {
				t.Fatalf("channel %d sample %d = %v, want %v", c, i, p.data[c][i], want)
			}
		}
		if want := uint64(i / 100 % 2); p.words[i] != want {
			t.Fatalf("sample %d: word %d, want %d", i, p.words[i], want)
		}
	}
}

func TestRealtimePacing(t *testing.T) {
	rec := writeRecording(t, t.TempDir(), 4, 3000, 30000) // 100 ms
	s := open(t, Config{Path: rec, Realtime: true})
	t0 := time.Now()
	p := playAll(t, s, 300)
	if len(p.words) != 3000 {
		t.Fatalf("%d samples", len(p.words))
	}
	if el := time.Since(t0); el < 95*time.Millisecond {
		t.Fatalf("100 ms of realtime samples read in %v", el)
	}
}

func TestStopUnblocksRealtimeRead(t *testing.T) {
	rec := writeRecording(t, t.TempDir(), 2, 20000, 1000) // 20 s
	s := open(t, Config{Path: rec, Realtime: true})
	b := newBlock(t, 2, 10000)
	done := make(chan error, 1)
	go func() { done <- s.ReadBlock(b) }()
	time.Sleep(20 * time.Millisecond)
	s.Stop()
	select {
	case err := <-done:
		if !errors.Is(err, io.EOF) {
			t.Fatalf("ReadBlock after Stop: %v, want io.EOF", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Stop did not unblock ReadBlock")
	}
	if err := s.ReadBlock(b); !errors.Is(err, io.EOF) {
		t.Fatalf("later ReadBlock: %v", err)
	}
}

func TestBlockChecks(t *testing.T) {
	rec := writeRecording(t, t.TempDir(), 3, 100, 30000)
	s, err := Open(Config{Path: rec})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	b := newBlock(t, 3, 10)
	if err := s.ReadBlock(b); err == nil || !strings.Contains(err.Error(), "before Start") {
		t.Fatalf("before Start: %v", err)
	}
	s.Start()
	if err := s.ReadBlock(newBlock(t, 4, 10)); err == nil || !strings.Contains(err.Error(), "block has 4 channels, the stream has 3") {
		t.Fatalf("channel count: %v", err)
	}
}

func TestReadBlockAllocs(t *testing.T) {
	rec := writeRecording(t, t.TempDir(), 16, 100000, 30000)
	s := open(t, Config{Path: rec})
	b := newBlock(t, 16, 64)
	if n := testing.AllocsPerRun(100, func() {
		if err := s.ReadBlock(b); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Fatalf("ReadBlock allocates %.1f times per block", n)
	}
}

// BenchmarkPlaybackReadBlock384 replays 384 channels at 30 kHz in blocks of
// 1024 samples as fast as possible and reports the speed as a multiple of
// real time.
func BenchmarkPlaybackReadBlock384(b *testing.B) {
	const samples = 30000
	rec := writeRecording(b, b.TempDir(), 384, samples, 30000)
	s := open(b, Config{Path: rec})
	blk := newBlock(b, 384, 1024)
	b.ReportAllocs()
	b.SetBytes(384 * 1024 * 2)
	b.ResetTimer()
	var read int
	for i := 0; i < b.N; i++ {
		err := s.ReadBlock(blk)
		if errors.Is(err, io.EOF) {
			b.StopTimer()
			s.pos, s.ei, s.word = 0, 0, 0 // rewind
			b.StartTimer()
			err = s.ReadBlock(blk)
		}
		if err != nil {
			b.Fatal(err)
		}
		read += blk.Samples
	}
	b.ReportMetric(float64(read)/30000/b.Elapsed().Seconds(), "x_realtime")
}

func TestPaced(t *testing.T) {
	rec := writeRecording(t, t.TempDir(), 2, 10, 30000)
	for _, rt := range []bool{true, false} {
		c := Config{Path: rec, Realtime: rt}
		src, err := c.Open()
		if err != nil {
			t.Fatal(err)
		}
		if p, ok := src.(interface{ Realtime() bool }); !ok || p.Realtime() != rt {
			t.Fatalf("Realtime() should be %v", rt)
		}
		src.Close()
	}
}
