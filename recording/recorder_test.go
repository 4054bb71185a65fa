package recording

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ephysd/ephysd/pipeline"
)

// testStream is a 4-channel, 30 kHz source with different resolutions per
// channel.
func testStream() pipeline.StreamInfo {
	return pipeline.StreamInfo{
		ProcessorName: "Simulated Headstage",
		ProcessorID:   100,
		StreamName:    "sim",
		SampleRate:    30000,
		Channels: []pipeline.ChannelInfo{
			{Name: "CH1", Units: "uV", BitVolts: 0.195},
			{Name: "CH2", Units: "uV", BitVolts: 0.195},
			{Name: "CH3", Units: "uV", BitVolts: 1},
			{Name: "CH4", Units: "V", BitVolts: 0.5},
		},
		TTLLines:       8,
		TTLChannelName: "TTL Input",
	}
}

// pythonChannel is the event channel of a Python stage.
var pythonChannel = EventChannel{ProcessorID: 101, ProcessorName: "Python Processor", ChannelName: "Python Processor Output"}

// specials are the values of channel 3 (bit_volts 1) and, halved, of channel
// 4 (bit_volts 0.5), with the int16 each must become: round half to even,
// clipped, NaN as 0.
var specials = []struct {
	in   float32
	want int16
}{
	{2.5, 2}, {3.5, 4}, {-2.5, -2}, {-3.5, -4}, {0.5, 0}, {1.5, 2}, {-0.5, 0},
	{40000, 32767}, {-40000, -32768}, {float32(math.NaN()), 0},
	{float32(math.Inf(1)), 32767}, {float32(math.Inf(-1)), -32768},
	{32767.5, 32767}, {-32768.5, -32768}, {1e30, 32767}, {7.499, 7}, {100.25, 100}, {-100.75, -101},
}

// sampleValue is the processed value of channel c at sample number k; raw
// (the pre-stage copy) is offset so the two streams differ.
func sampleValue(c int, k int64, raw bool) float32 {
	var v float32
	switch c {
	case 0:
		v = float32(150 * math.Sin(float64(k)/7))
	case 1:
		v = float32(7000*math.Cos(float64(k)/3)) + 0.0975 // often beyond the int16 range at 0.195
	case 2:
		v = specials[k%int64(len(specials))].in
	case 3:
		v = specials[k%int64(len(specials))].in / 2
	}
	if raw {
		v += 10
	}
	return v
}

// digitalWord is the state of the source's input lines at sample k of
// experiment e.
func digitalWord(e int, k int64) uint64 {
	in := func(lo, hi int64) bool { return k >= lo && k < hi }
	var w uint64
	switch e {
	case 1:
		if in(5, 65) || in(250, 320) || in(470, 520) {
			w |= 1
		}
		if in(40, 100) || in(500, 560) {
			w |= 2
		}
	case 2:
		if in(10, 20) || in(100, 130) {
			w |= 1
		}
		if in(15, 60) {
			w |= 2
		}
	}
	return w
}

// feed is what a test sends to a recorder.
type feed struct {
	stream   pipeline.StreamInfo
	blocks   []*pipeline.Block
	inputs   map[string][]float32 // "<exp>/<rec>/<stream>" → sample-major values
	firsts   map[string]int64     // "<exp>/<rec>" → first sample number
	events   map[string][]pipeline.Event
	nans     uint64
	dropped  uint64
	recorded map[string]int // "<exp>/<rec>" → samples
}

// span is a run of blocks: rec nil means not recorded.
type span struct {
	rec       *pipeline.Recording
	exp       int // experiment the samples belong to (digital pattern)
	first     int64
	blocks    int
	python    map[int64]pipeline.Event // python events by block first sample
	messages  map[int64]string         // messages by sample number (in its block)
	unknownAt int64                    // a TTL event of an unknown processor at this sample, -1 none
}

const blockSamples = 30

func makeFeed(spans []span) *feed {
	f := &feed{
		stream:   testStream(),
		inputs:   map[string][]float32{},
		firsts:   map[string]int64{},
		events:   map[string][]pipeline.Event{},
		recorded: map[string]int{},
	}
	nch := len(f.stream.Channels)
	prev := uint64(0)
	prevExp := 0
	for _, sp := range spans {
		if sp.exp != prevExp {
			prev = 0 // acquisition restarted
			prevExp = sp.exp
		}
		for bi := 0; bi < sp.blocks; bi++ {
			first := sp.first + int64(bi*blockSamples)
			b := &pipeline.Block{Channels: nch, Samples: blockSamples, FirstSample: first,
				Data: make([]float32, nch*blockSamples), Digital: make([]uint64, blockSamples), Recording: sp.rec}
			raw := &pipeline.Block{Channels: nch, Samples: blockSamples, FirstSample: first,
				Data: make([]float32, nch*blockSamples), Digital: make([]uint64, blockSamples), Recording: sp.rec}
			for c := 0; c < nch; c++ {
				for i := 0; i < blockSamples; i++ {
					b.Data[c*blockSamples+i] = sampleValue(c, first+int64(i), false)
					raw.Data[c*blockSamples+i] = sampleValue(c, first+int64(i), true)
				}
			}
			for i := range b.Digital {
				b.Digital[i] = digitalWord(sp.exp, first+int64(i))
			}
			copy(raw.Digital, b.Digital)
			b.Raw = raw
			b.Events, prev = pipeline.AppendEdges(b.Events, f.stream.ProcessorID, prev, b.Digital, first)
			for k := first; k < first+blockSamples; k++ {
				if text, ok := sp.messages[k]; ok {
					b.Events = append(b.Events, pipeline.Event{Kind: pipeline.EventMessage, Processor: pipeline.MessageCenterID, SampleNumber: k, Text: text})
				}
			}
			if ev, ok := sp.python[first]; ok {
				b.Events = append(b.Events, ev)
			}
			if sp.unknownAt >= first && sp.unknownAt < first+blockSamples {
				b.Events = append(b.Events, pipeline.Event{Kind: pipeline.EventTTL, Processor: 55, Line: 3, State: true, SampleNumber: sp.unknownAt})
			}
			f.blocks = append(f.blocks, b)
			if sp.rec == nil {
				continue
			}
			key := fmt.Sprintf("%d/%d", sp.rec.Experiment, sp.rec.Number)
			if _, ok := f.firsts[key]; !ok {
				f.firsts[key] = first
			}
			f.recorded[key] += blockSamples
			for i := 0; i < blockSamples; i++ {
				for c := 0; c < nch; c++ {
					x := b.Data[c*blockSamples+i]
					f.inputs[key+"/sim"] = append(f.inputs[key+"/sim"], x)
					f.inputs[key+"/sim_raw"] = append(f.inputs[key+"/sim_raw"], raw.Data[c*blockSamples+i])
					if x != x {
						f.nans++
					}
					if y := raw.Data[c*blockSamples+i]; y != y {
						f.nans++
					}
				}
			}
			for _, ev := range b.Events {
				if ev.Kind == pipeline.EventTTL && ev.Processor == 55 {
					f.dropped++
					continue
				}
				f.events[key] = append(f.events[key], ev)
			}
		}
	}
	return f
}

// toInt16 is the conversion the format asks for, written independently of
// the recorder's loop.
func toInt16(x float32, bitVolts float64) int16 {
	v := float64(x) / bitVolts
	if math.IsNaN(v) {
		return 0
	}
	v = math.Max(math.MinInt16, math.Min(math.MaxInt16, v))
	return int16(math.RoundToEven(v))
}

// neoScript reads a session folder with neo and numpy. argv: session folder,
// JSON {"<exp>/<rec>/<stream>": {"file": float32 input, "bit_volts": [...]}}.
// It prints what the readers see, as JSON.
const neoScript = `
import sys, os, json
import numpy as np
from neo.rawio.openephysbinaryrawio import OpenEphysBinaryRawIO

session = sys.argv[1]
inputs = json.loads(sys.argv[2])
io = OpenEphysBinaryRawIO(dirname=session)
io.parse_header()
h = io.header
out = {
    'nb_block': int(h['nb_block']),
    'nb_segment': [int(h['nb_segment'][b]) for b in range(h['nb_block'])],
    'signal_streams': [str(s['name']) for s in h['signal_streams']],
    'signal_channels': [[str(c['name']), str(c['units']), float(c['gain']), str(c['stream_id'])] for c in h['signal_channels']],
    'event_channels': [str(e['name']) for e in h['event_channels']],
    'segments': {},
}
for b in range(h['nb_block']):
    for s in range(h['nb_segment'][b]):
        seg = {'t_start': float(io.segment_t_start(b, s)), 'streams': {}, 'events': {}}
        for si, st in enumerate(h['signal_streams']):
            name = str(st['name']).split('#')[-1].split('.')[-1]
            n = io.get_signal_size(b, s, si)
            chunk = io.get_analogsignal_chunk(block_index=b, seg_index=s, i_start=0, i_stop=n, stream_index=si)
            inp = inputs['%d/%d/%s' % (b + 1, s + 1, name)]
            x = np.fromfile(inp['file'], dtype='<f4').reshape(-1, len(inp['bit_volts']))
            with np.errstate(invalid='ignore', over='ignore'):
                v = x.astype(np.float64) / np.array(inp['bit_volts'])
                v[np.isnan(v)] = 0
                want = np.rint(np.clip(v, -32768, 32767)).astype(np.int16)
            seg['streams'][name] = {
                'size': int(n), 't_start': float(io.get_signal_t_start(b, s, si)),
                'dtype': chunk.dtype.str, 'shape': list(chunk.shape),
                'mismatches': int((chunk != want).sum()) if chunk.shape == want.shape else -1,
                'head': chunk[:20].tolist(),
            }
        for ei, ec in enumerate(h['event_channels']):
            ts, dur, labels = io.get_event_timestamps(block_index=b, seg_index=s, event_channel_index=ei)
            seg['events'][str(ec['name'])] = {
                'count': int(io.event_count(b, s, ei)),
                'times': [float(t) for t in ts], 'labels': [str(l) for l in labels],
                'durations': None if dur is None else [float(d) for d in dur],
            }
        out['segments']['%d/%d' % (b + 1, s + 1)] = seg
files = {}
for root, dirs, names in os.walk(session):
    for f in names:
        p = os.path.join(root, f)
        rel = os.path.relpath(p, session)
        if f.endswith('.npy'):
            a = np.load(p)
            files[rel] = {'dtype': a.dtype.str, 'shape': list(a.shape),
                          'values': [x.decode() if isinstance(x, bytes) else x for x in a.tolist()]}
        elif f == 'structure.oebin':
            with open(p) as fh:
                files[rel] = {'oebin': json.load(fh)}
        else:
            files[rel] = {}
out['files'] = files
print(json.dumps(out))
`

// neoView is what neoScript prints.
type neoView struct {
	NbBlock        int      `json:"nb_block"`
	NbSegment      []int    `json:"nb_segment"`
	SignalStreams  []string `json:"signal_streams"`
	SignalChannels [][]any  `json:"signal_channels"`
	EventChannels  []string `json:"event_channels"`
	Segments       map[string]struct {
		TStart  float64 `json:"t_start"`
		Streams map[string]struct {
			Size       int
			TStart     float64 `json:"t_start"`
			Dtype      string
			Shape      []int
			Mismatches int
			Head       [][]int
		}
		Events map[string]struct {
			Count     int
			Times     []float64
			Labels    []string
			Durations []float64
		}
	}
	Files map[string]struct {
		Dtype  string
		Shape  []int
		Values []any
		Oebin  *oebin
	}
}

// readWithNeo writes the float32 inputs of f next to the session and runs
// neoScript.
func readWithNeo(t *testing.T, session string, f *feed) *neoView {
	t.Helper()
	inDir := t.TempDir()
	bv := []float64{}
	for _, ch := range f.stream.Channels {
		bv = append(bv, ch.BitVolts)
	}
	inputs := map[string]any{}
	for key, vals := range f.inputs {
		p := filepath.Join(inDir, strings.ReplaceAll(key, "/", "_")+".f32")
		buf := make([]byte, 4*len(vals))
		for i, v := range vals {
			binary.LittleEndian.PutUint32(buf[4*i:], math.Float32bits(v))
		}
		if err := os.WriteFile(p, buf, 0o644); err != nil {
			t.Fatal(err)
		}
		inputs[key] = map[string]any{"file": p, "bit_volts": bv}
	}
	arg, _ := json.Marshal(inputs)
	var v neoView
	runPython(t, neoScript, &v, session, string(arg))
	return &v
}

// pyEvent is a TTL event of the Python stage.
func pyEvent(k int64, line uint8, state bool) pipeline.Event {
	var w uint64
	if state {
		w = 1 << line
	}
	return pipeline.Event{Kind: pipeline.EventTTL, Processor: pythonChannel.ProcessorID, Line: line, State: state, SampleNumber: k, FullWord: w}
}

// record feeds every block of f to a new recorder and ends it.
func record(t *testing.T, cfg Config, f *feed) *Recorder {
	t.Helper()
	rec, err := NewRecorder(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range f.blocks {
		if err := rec.Consume(b); err != nil {
			t.Fatal(err)
		}
	}
	if err := rec.End(); err != nil {
		t.Fatal(err)
	}
	if err := rec.End(); err != nil { // idempotent
		t.Fatalf("second End: %v", err)
	}
	return rec
}

// ttlView splits the expected events of a recording by channel.
func ttlView(evs []pipeline.Event, processor int) (states []float64, sns []float64, words []float64) {
	for _, ev := range evs {
		if ev.Kind != pipeline.EventTTL || ev.Processor != processor {
			continue
		}
		s := float64(ev.Line) + 1
		if !ev.State {
			s = -s
		}
		states = append(states, s)
		sns = append(sns, float64(ev.SampleNumber))
		words = append(words, float64(ev.FullWord))
	}
	return
}

// neoEpochs is what neo 0.11 makes of a TTL channel: the rising edges (the
// last dropped if it is never followed by a falling one, the first falling
// dropped if it comes first) and, when the counts match, durations.
func neoEpochs(states, sns []float64, rate float64) (times []float64, labels []string, durations []float64) {
	var rising, falling []int
	for i, s := range states {
		if s > 0 {
			rising = append(rising, i)
		} else {
			falling = append(falling, i)
		}
	}
	if len(states) > 0 && states[0] < 0 {
		falling = falling[1:]
	}
	if len(states) > 0 && states[len(states)-1] > 0 {
		rising = rising[:len(rising)-1]
	}
	for k, i := range rising {
		times = append(times, sns[i]/rate)
		labels = append(labels, fmt.Sprint(int(states[i])))
		if len(rising) == len(falling) {
			durations = append(durations, sns[falling[k]]/rate-sns[i]/rate)
		}
	}
	return
}

func floatsEqual(a, b []float64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func anyFloats(vals []any) []float64 {
	out := make([]float64, len(vals))
	for i, v := range vals {
		out[i], _ = v.(float64)
	}
	return out
}

// TestRecorderReadBack records two experiments (three recordings with a
// record stop/start and a direct switch between recordings in the first,
// one in the second) with a raw stream, source TTL edges on lines 0 and 1, a
// Python event channel, messages and an event of an unknown processor, and
// reads it back with Debian's neo and numpy.
func TestRecorderReadBack(t *testing.T) {
	parent := t.TempDir()
	clock := time.Date(2024, 3, 5, 14, 7, 9, 0, time.UTC)
	s := NewSession(parent, 0, func() time.Time { return clock })
	r1, _ := s.Next()
	r2, _ := s.Next()
	r3, _ := s.Next()
	s.AcquisitionStopped()
	r4, _ := s.Next()
	f := makeFeed([]span{
		{rec: r1, exp: 1, first: 0, blocks: 10, unknownAt: 77,
			python:   map[int64]pipeline.Event{60: pyEvent(60, 0, true), 120: pyEvent(120, 0, false)},
			messages: map[int64]string{10: "hello", 200: "a longer message: stimulus on"}},
		{rec: nil, exp: 1, first: 300, blocks: 5, unknownAt: -1,
			python:   map[int64]pipeline.Event{330: pyEvent(330, 1, true)},
			messages: map[int64]string{301: "not recorded"}},
		{rec: r2, exp: 1, first: 450, blocks: 3, unknownAt: -1,
			python:   map[int64]pipeline.Event{480: pyEvent(480, 2, true), 510: pyEvent(510, 2, false)},
			messages: map[int64]string{455: "second"}},
		{rec: r3, exp: 1, first: 540, blocks: 2, unknownAt: -1,
			python:   map[int64]pipeline.Event{540: pyEvent(540, 2, true)},
			messages: map[int64]string{541: "third, longest message of them all"}},
		{rec: r4, exp: 2, first: 0, blocks: 5, unknownAt: -1,
			python:   map[int64]pipeline.Event{30: pyEvent(30, 0, true), 90: pyEvent(90, 0, false)},
			messages: map[int64]string{1: "fourth"}},
	})
	rec := record(t, Config{Stream: f.stream, RecordRaw: true, EventChannels: []EventChannel{pythonChannel}}, f)

	st := rec.Stats()
	if st.NaNSamples != f.nans || f.nans == 0 {
		t.Errorf("Stats.NaNSamples = %d, want %d (> 0)", st.NaNSamples, f.nans)
	}
	if st.DroppedEvents != f.dropped || f.dropped != 1 {
		t.Errorf("Stats.DroppedEvents = %d, want %d (1)", st.DroppedEvents, f.dropped)
	}

	v := readWithNeo(t, r1.Dir, f)
	const rate = 30000.0

	// Layout as neo sees it.
	if v.NbBlock != 2 || len(v.NbSegment) != 2 || v.NbSegment[0] != 3 || v.NbSegment[1] != 1 {
		t.Fatalf("neo sees %d blocks with %v segments, want 2 with [3 1]", v.NbBlock, v.NbSegment)
	}
	wantStreams := []string{"Record Node 101#Simulated_Headstage-100.sim", "Record Node 101#Simulated_Headstage-100.sim_raw"}
	if strings.Join(v.SignalStreams, ",") != strings.Join(wantStreams, ",") {
		t.Errorf("neo signal streams %v, want %v", v.SignalStreams, wantStreams)
	}
	if len(v.SignalChannels) != 8 {
		t.Fatalf("neo sees %d signal channels, want 8", len(v.SignalChannels))
	}
	for i, ch := range v.SignalChannels {
		want := f.stream.Channels[i%4]
		if ch[0] != want.Name || ch[1] != want.Units || ch[2] != want.BitVolts {
			t.Errorf("neo channel %d = %v, want %s %s %v", i, ch, want.Name, want.Units, want.BitVolts)
		}
	}
	// neo 0.11 keys event streams by their last folder: the two "TTL"
	// folders collide and the last listed (the source's) wins.
	if strings.Join(v.EventChannels, ",") != "Messages,TTL Input" {
		t.Errorf("neo event channels %v, want [Messages TTL Input]", v.EventChannels)
	}

	recs := map[string]*pipeline.Recording{"1/1": r1, "1/2": r2, "1/3": r3, "2/1": r4}
	for key, r := range recs {
		seg, ok := v.Segments[key]
		if !ok {
			t.Errorf("neo has no segment %s", key)
			continue
		}
		first, n := f.firsts[key], f.recorded[key]
		for _, name := range []string{"sim", "sim_raw"} {
			sv := seg.Streams[name]
			if sv.Size != n || sv.TStart != float64(first)/rate || sv.Dtype != "<i2" || sv.Mismatches != 0 {
				t.Errorf("%s %s: neo size %d t_start %v dtype %s, %d values differ from numpy's rint(clip(x/bit_volts)); want size %d t_start %v",
					key, name, sv.Size, sv.TStart, sv.Dtype, sv.Mismatches, n, float64(first)/rate)
			}
			for i, row := range sv.Head {
				k := first + int64(i)
				for c, got := range row {
					want := toInt16(sampleValue(c, k, name == "sim_raw"), f.stream.Channels[c].BitVolts)
					if got != int(want) {
						t.Errorf("%s %s sample %d channel %d: neo reads %d, want %d", key, name, k, c, got, want)
					}
				}
			}
		}
		if key == "1/1" {
			for i, sp := range specials {
				row := seg.Streams["sim"].Head[i]
				if row[2] != int(sp.want) || row[3] != int(sp.want) {
					t.Errorf("value %v: recorded as %d (bit_volts 1) and %d (half, bit_volts 0.5), want %d", sp.in, row[2], row[3], sp.want)
				}
			}
		}

		// Events through neo.
		var msgSN []float64
		var msgText []any
		for _, ev := range f.events[key] {
			if ev.Kind == pipeline.EventMessage {
				msgSN = append(msgSN, float64(ev.SampleNumber))
				msgText = append(msgText, ev.Text)
			}
		}
		var msgTimes []float64
		var msgLabels []string
		for i, sn := range msgSN {
			msgTimes = append(msgTimes, sn/rate)
			msgLabels = append(msgLabels, msgText[i].(string))
		}
		m := seg.Events["Messages"]
		if m.Count != len(msgSN) || !floatsEqual(m.Times, msgTimes) || strings.Join(m.Labels, "|") != strings.Join(msgLabels, "|") {
			t.Errorf("%s: neo messages %d %v %q, want %v %q", key, m.Count, m.Times, m.Labels, msgTimes, msgLabels)
		}
		states, sns, words := ttlView(f.events[key], f.stream.ProcessorID)
		times, labels, durs := neoEpochs(states, sns, rate)
		e := seg.Events["TTL Input"]
		if e.Count != len(times) || !floatsEqual(e.Times, times) || strings.Join(e.Labels, ",") != strings.Join(labels, ",") || !floatsEqual(e.Durations, durs) {
			t.Errorf("%s: neo TTL %d %v %v %v, want %v %v %v", key, e.Count, e.Times, e.Labels, e.Durations, times, labels, durs)
		}

		// Every file through numpy.
		rp, _ := filepath.Rel(r1.Dir, RecordingPath(r, 101))
		file := func(rel string) (string, []float64, []int, bool) {
			fv, ok := v.Files[filepath.Join(rp, rel)]
			return fv.Dtype, anyFloats(fv.Values), fv.Shape, ok
		}
		checkNpy := func(rel, dtype string, want []float64) {
			t.Helper()
			d, got, shape, ok := file(rel)
			if !ok {
				t.Errorf("%s: %s missing", key, rel)
				return
			}
			if d != dtype || len(shape) != 1 || !floatsEqual(got, want) {
				t.Errorf("%s: %s is %s %v %v, want %s %v", key, rel, d, shape, got, dtype, want)
			}
		}
		var wantSN, wantTS []float64
		for i := 0; i < n; i++ {
			wantSN = append(wantSN, float64(first+int64(i)))
			wantTS = append(wantTS, float64(first+int64(i))/rate)
		}
		for _, folder := range []string{"Simulated_Headstage-100.sim", "Simulated_Headstage-100.sim_raw"} {
			checkNpy("continuous/"+folder+"/sample_numbers.npy", "<i8", wantSN)
			checkNpy("continuous/"+folder+"/timestamps.npy", "<f8", wantTS)
			dat, err := os.ReadFile(filepath.Join(RecordingPath(r, 101), "continuous", folder, "continuous.dat"))
			if err != nil {
				t.Fatal(err)
			}
			if len(dat) != n*4*2 {
				t.Errorf("%s: %s continuous.dat has %d bytes, want %d", key, folder, len(dat), n*8)
				continue
			}
			for i := 0; i < n; i++ {
				for c := 0; c < 4; c++ {
					got := int16(binary.LittleEndian.Uint16(dat[2*(i*4+c):]))
					want := toInt16(sampleValue(c, first+int64(i), strings.HasSuffix(folder, "_raw")), f.stream.Channels[c].BitVolts)
					if got != want {
						t.Fatalf("%s: %s sample %d channel %d = %d, want %d", key, folder, first+int64(i), c, got, want)
					}
				}
			}
		}
		for _, ch := range []struct {
			folder string
			proc   int
		}{{"Simulated_Headstage-100.sim", 100}, {"Python_Processor-101.sim", 101}} {
			states, sns, words := ttlView(f.events[key], ch.proc)
			var ts []float64
			for _, sn := range sns {
				ts = append(ts, sn/rate)
			}
			base := "events/" + ch.folder + "/TTL/"
			checkNpy(base+"states.npy", "<i2", states)
			checkNpy(base+"sample_numbers.npy", "<i8", sns)
			checkNpy(base+"timestamps.npy", "<f8", ts)
			checkNpy(base+"full_words.npy", "<u8", words)
		}
		_ = words
		checkNpy("events/MessageCenter/sample_numbers.npy", "<i8", msgSN)
		checkNpy("events/MessageCenter/timestamps.npy", "<f8", msgTimes)
		if fv := v.Files[filepath.Join(rp, "events/MessageCenter/text.npy")]; fmt.Sprint(fv.Values) != fmt.Sprint(msgText) || !strings.HasPrefix(fv.Dtype, "|S") {
			t.Errorf("%s: text.npy %s %v, want %v", key, fv.Dtype, fv.Values, msgText)
		} else {
			width := 0
			for _, m := range msgText {
				width = max(width, len(m.(string)))
			}
			if fv.Dtype != fmt.Sprintf("|S%d", width) {
				t.Errorf("%s: text.npy dtype %s, want |S%d", key, fv.Dtype, width)
			}
		}

		// structure.oebin.
		ob := v.Files[filepath.Join(rp, "structure.oebin")].Oebin
		if ob == nil {
			t.Errorf("%s: no structure.oebin", key)
			continue
		}
		if ob.GUIVersion != "1.0.1" || len(ob.Continuous) != 2 || ob.Spikes == nil || len(ob.Spikes) != 0 {
			t.Errorf("%s: oebin %+v", key, ob)
			continue
		}
		c0 := ob.Continuous[0]
		if c0.FolderName != "Simulated_Headstage-100.sim/" || c0.StreamName != "sim" || c0.SampleRate != rate ||
			c0.SourceProcessorID != 100 || c0.SourceProcessorName != "Simulated Headstage" || c0.NumChannels != 4 ||
			len(c0.Channels) != 4 || c0.Channels[3].BitVolts != 0.5 || c0.Channels[3].Units != "V" {
			t.Errorf("%s: oebin continuous[0] %+v", key, c0)
		}
		if ob.Continuous[1].FolderName != "Simulated_Headstage-100.sim_raw/" || ob.Continuous[1].StreamName != "sim_raw" {
			t.Errorf("%s: oebin continuous[1] %+v", key, ob.Continuous[1])
		}
		var folders []string
		for _, e := range ob.Events {
			folders = append(folders, e.FolderName+"="+e.ChannelName)
		}
		wantFolders := "Python_Processor-101.sim/TTL/=Python Processor Output,"
		if ttlCount := len(states); ttlCount > 0 {
			wantFolders += "Simulated_Headstage-100.sim/TTL/=TTL Input,"
		}
		wantFolders += "MessageCenter/=Messages"
		if got := strings.Join(folders, ","); got != wantFolders {
			t.Errorf("%s: oebin events %s, want %s", key, got, wantFolders)
		}
	}

	// Files beside the recordings.
	node := filepath.Join(r1.Dir, "Record Node 101")
	for _, name := range []string{"settings.xml", "settings_2.xml"} {
		data, err := os.ReadFile(filepath.Join(node, name))
		if err != nil || !strings.Contains(string(data), "<SETTINGS>") || !strings.Contains(string(data), "<INFO>") || !strings.Contains(string(data), "<VERSION>1.0.1</VERSION>") {
			t.Errorf("%s: %v\n%s", name, err, data)
		}
	}
	for key, r := range recs {
		data, err := os.ReadFile(filepath.Join(RecordingPath(r, 101), "sync_messages.txt"))
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(string(data), "\r\n")
		first := f.firsts[key]
		if len(lines) != 4 || lines[3] != "" || !strings.HasPrefix(lines[0], "Software Time (milliseconds since midnight Jan 1st 1970 UTC): ") ||
			lines[1] != fmt.Sprintf("Start Time for Simulated Headstage (100) - sim @ 30000 Hz: %d", first) ||
			lines[2] != fmt.Sprintf("Start Time for Simulated Headstage (100) - sim_raw @ 30000 Hz: %d", first) {
			t.Errorf("%s: sync_messages.txt = %q", key, data)
		}
	}
}

// TestRecorderOmitsEmptyEventChannels checks that an event channel without
// events is neither in structure.oebin nor on disk, and that neo opens such
// a recording.
func TestRecorderOmitsEmptyEventChannels(t *testing.T) {
	s := NewSession(t.TempDir(), 0, nil)
	r1, _ := s.Next()
	f := makeFeed([]span{{rec: r1, exp: 1, first: 0, blocks: 4, unknownAt: -1}}) // TTL edges only
	record(t, Config{Stream: f.stream, EventChannels: []EventChannel{pythonChannel}}, f)
	dir := RecordingPath(r1, 101)
	for _, absent := range []string{"events/Python_Processor-101.sim", "events/MessageCenter", "continuous/Simulated_Headstage-100.sim_raw"} {
		if _, err := os.Stat(filepath.Join(dir, absent)); !os.IsNotExist(err) {
			t.Errorf("%s exists (%v); it has no data", absent, err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "events/Simulated_Headstage-100.sim/TTL/states.npy")); err != nil {
		t.Error(err)
	}
	v := readWithNeo(t, r1.Dir, f)
	ob := v.Files[filepath.Join("Record Node 101/experiment1/recording1/structure.oebin")].Oebin
	if ob == nil || len(ob.Events) != 1 || ob.Events[0].FolderName != "Simulated_Headstage-100.sim/TTL/" || len(ob.Continuous) != 1 {
		t.Fatalf("oebin %+v, want one continuous stream and only the source's TTL channel", ob)
	}
	seg := v.Segments["1/1"]
	states, sns, _ := ttlView(f.events["1/1"], 100)
	times, _, _ := neoEpochs(states, sns, 30000)
	if len(states) == 0 || seg.Events["TTL Input"].Count != len(times) || seg.Streams["sim"].Size != 120 || seg.Streams["sim"].TStart != 0 {
		t.Errorf("neo: %+v, want %d TTL epochs and 120 samples from sample 0", seg, len(times))
	}
}

// TestRecorderErrors checks that failures name what failed and where.
func TestRecorderErrors(t *testing.T) {
	st := testStream()
	bad := st
	bad.StreamName = "my-stream"
	if _, err := NewRecorder(Config{Stream: bad}); err == nil || !strings.Contains(err.Error(), "'-'") {
		t.Errorf("stream name with '-': %v", err)
	}
	bad = st
	bad.Channels = append([]pipeline.ChannelInfo(nil), st.Channels...)
	bad.Channels[2].BitVolts = 0
	if _, err := NewRecorder(Config{Stream: bad}); err == nil || !strings.Contains(err.Error(), "CH3") {
		t.Errorf("bit_volts 0: %v", err)
	}
	if _, err := NewRecorder(Config{Stream: st, EventChannels: []EventChannel{{ProcessorID: 100, ProcessorName: "X"}}}); err == nil {
		t.Error("an event channel with the source's processor id was accepted")
	}

	// A recording folder that was already written is not written over.
	s := NewSession(t.TempDir(), 0, nil)
	r1, _ := s.Next()
	f := makeFeed([]span{{rec: r1, exp: 1, first: 0, blocks: 2, unknownAt: -1}})
	record(t, Config{Stream: st}, f)
	rec, _ := NewRecorder(Config{Stream: st})
	err := rec.Consume(f.blocks[0])
	if err == nil || !strings.Contains(err.Error(), filepath.Join(RecordingPath(r1, 101), "continuous")) || !strings.Contains(err.Error(), "already exists") {
		t.Errorf("recording into a used folder: %v", err)
	}
	if err2 := rec.End(); err2 != err {
		t.Errorf("End after a failure returned %v, want the failure %v", err2, err)
	}

	// A session folder that cannot hold the record node folder.
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "Record Node 101"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	b := makeFeed([]span{{rec: &pipeline.Recording{Dir: dir, Experiment: 1, Number: 1}, exp: 1, blocks: 1, unknownAt: -1}}).blocks[0]
	rec, _ = NewRecorder(Config{Stream: st})
	if err := rec.Consume(b); err == nil || !strings.Contains(err.Error(), "Record Node 101") || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("record node path is a file: %v", err)
	}
	rec.End()

	// RecordRaw without raw copies.
	b.Raw = nil
	b.Recording = &pipeline.Recording{Dir: t.TempDir(), Experiment: 1, Number: 1}
	rec, _ = NewRecorder(Config{Stream: st, RecordRaw: true})
	if err := rec.Consume(b); err == nil || !strings.Contains(err.Error(), "KeepRaw") {
		t.Errorf("RecordRaw without Block.Raw: %v", err)
	}
	rec.End()
}

// TestRecorderWriteErrorStops checks that a failing write (a full disk,
// here /dev/full behind continuous.dat) comes back from Consume with the
// file's path, and that End reports it too.
func TestRecorderWriteErrorStops(t *testing.T) {
	full, err := os.OpenFile("/dev/full", os.O_WRONLY, 0)
	if err != nil {
		t.Skipf("no /dev/full: %v", err)
	}
	s := NewSession(t.TempDir(), 0, nil)
	r1, _ := s.Next()
	f := makeFeed([]span{{rec: r1, exp: 1, first: 0, blocks: 3, unknownAt: -1}})
	rec, err := NewRecorder(Config{Stream: f.stream, CheckpointInterval: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	if err := rec.Consume(f.blocks[0]); err != nil {
		t.Fatal(err)
	}
	rec.mu.Lock()
	dat := rec.rec.streams[0].dat
	dat.f.Close()
	dat.f = full // the disk fills up
	rec.mu.Unlock()
	err = rec.Consume(f.blocks[1])
	want := "recording: write " + dat.path + ": no space left on device"
	if err == nil || err.Error() != want {
		t.Fatalf("Consume after the disk filled: %v, want %q", err, want)
	}
	if err2 := rec.Consume(f.blocks[2]); err2 != err {
		t.Errorf("the next Consume returned %v, want the same error", err2)
	}
	if err2 := rec.End(); err2 != err {
		t.Errorf("End returned %v, want %v", err2, err)
	}
}
