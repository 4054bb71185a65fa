package recording

import (
	"encoding/json"
	"fmt"
	"math"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/ephysd/ephysd/pipeline"
)

// spikeSources is a detector (id 105) with a tetrode on channels 0–3
// (waveforms at channel 0's 0.195 µV) and a single electrode on channel 2
// (1 µV).
var spikeSources = []SpikeSource{{
	ProcessorID: 105, ProcessorName: "Spike Detector",
	Electrodes: []Electrode{
		{Name: "Tetrode 1", Channels: []int{0, 1, 2, 3}, PrePeakSamples: 2},
		{Name: "Electrode 2", Channels: []int{2}, PrePeakSamples: 1},
	},
}}

// wantElectrode is what one electrode folder must hold.
type wantElectrode struct {
	Name, Folder, ProcName string
	Proc                   int
	Channels, Samples, Pre int
	SourceNames            []string
	LocalIndex             []int
	BitVolts               float64
	Index                  int
	SampleNumbers          []int64
	Clusters               []int
	Waves                  []int16 // all spikes' waveforms, flattened
	Blocks                 []int   // the feed's block of each spike
}

// spikeFeed builds the blocks of a recording with spikes and what each
// electrode folder must then hold, in the order of first appearance.
type spikeFeed struct {
	blocks     []*pipeline.Block
	electrodes []*wantElectrode
	byKey      map[string]*wantElectrode
	dropped    int
	nans       int
}

func newSpikeFeed() *spikeFeed { return &spikeFeed{byKey: map[string]*wantElectrode{}} }

// spikeWave is a waveform with values off the int16 grid, a clipped value
// and, when nan, a NaN.
func spikeWave(seed int64, n int, nan bool) []float32 {
	w := make([]float32, n)
	for i := range w {
		w[i] = float32((seed*37+int64(i)*13)%400-200)*1.3 + 0.0975
	}
	if n > 2 {
		w[1] = 50000 // beyond int16 at any of the resolutions here
	}
	if nan {
		w[n-1] = float32(math.NaN())
	}
	return w
}

// add puts a spike in b and, unless it must be dropped, into the
// expectation: want is the electrode folder's expectation template, used
// the first time the (processor, electrode, shape) is seen.
func (f *spikeFeed) add(b *pipeline.Block, sp pipeline.Spike, want *wantElectrode) {
	b.Spikes = append(b.Spikes, sp)
	if want == nil {
		f.dropped++
		return
	}
	key := fmt.Sprintf("%d/%s/%dx%d", sp.Processor, sp.Electrode, sp.Channels, sp.Samples)
	e := f.byKey[key]
	if e == nil {
		e = want
		e.Index = len(f.electrodes) + 1
		f.byKey[key] = e
		f.electrodes = append(f.electrodes, e)
	}
	e.SampleNumbers = append(e.SampleNumbers, sp.SampleNumber)
	e.Blocks = append(e.Blocks, len(f.blocks))
	e.Clusters = append(e.Clusters, sp.SortedID)
	for _, x := range sp.Waveform {
		if x != x {
			f.nans++
		}
		e.Waves = append(e.Waves, toInt16(x, e.BitVolts))
	}
}

func tetrodeWant(folder, procName string, proc int) *wantElectrode {
	return &wantElectrode{Name: "Tetrode 1", Folder: folder, ProcName: procName, Proc: proc, Channels: 4, Samples: 6, Pre: 2,
		SourceNames: []string{"CH1", "CH2", "CH3", "CH4"}, LocalIndex: []int{0, 1, 2, 3}, BitVolts: 0.195}
}

func undescribed(name, folder, procName string, proc, channels, samples int) *wantElectrode {
	w := &wantElectrode{Name: name, Folder: folder, ProcName: procName, Proc: proc, Channels: channels, Samples: samples,
		BitVolts: 0.195}
	for c := 0; c < channels; c++ {
		w.SourceNames = append(w.SourceNames, "")
		w.LocalIndex = append(w.LocalIndex, -1)
	}
	return w
}

// makeSpikeFeed makes blocks of 30 samples from sample first, recorded in
// rec, with detector and Python spikes of several electrodes and shapes,
// electrodes appearing late, and spikes that must be dropped.
func makeSpikeFeed(f *spikeFeed, rec *pipeline.Recording, first int64, blocks int) {
	nch := 4
	for k := 0; k < blocks; k++ {
		s0 := first + int64(k*blockSamples)
		b := &pipeline.Block{Channels: nch, Samples: blockSamples, FirstSample: s0, Recording: rec,
			Data: make([]float32, nch*blockSamples), Digital: make([]uint64, blockSamples)}
		for c := 0; c < nch; c++ {
			for i := 0; i < blockSamples; i++ {
				b.Data[c*blockSamples+i] = sampleValue(c, s0+int64(i), false)
			}
		}
		if k == 0 {
			// neo 0.11 cannot open a recording without a single event.
			b.Events = append(b.Events, pipeline.Event{Kind: pipeline.EventMessage, Processor: pipeline.MessageCenterID,
				SampleNumber: s0, Text: "spikes follow"})
		}
		if k%2 == 0 {
			f.add(b, pipeline.Spike{Processor: 105, Electrode: "Tetrode 1", SampleNumber: s0 + 5, Channels: 4, Samples: 6,
				Waveform: spikeWave(s0, 24, k == 4)}, tetrodeWant("Spike_Detector-105.sim/Tetrode_1/", "Spike Detector", 105))
		}
		if k%3 == 0 {
			f.add(b, pipeline.Spike{Processor: 105, Electrode: "Electrode 2", SampleNumber: s0 - 10, SortedID: 1, Channels: 1, Samples: 6,
				Waveform: spikeWave(s0+1, 6, false)},
				&wantElectrode{Name: "Electrode 2", Folder: "Spike_Detector-105.sim/Electrode_2/", ProcName: "Spike Detector", Proc: 105,
					Channels: 1, Samples: 6, Pre: 1, SourceNames: []string{"CH3"}, LocalIndex: []int{2}, BitVolts: 1})
		}
		if k%4 == 1 {
			// A Python stage relabels the tetrode: described by the name.
			f.add(b, pipeline.Spike{Processor: 101, Electrode: "Tetrode 1", SampleNumber: s0 + 7, SortedID: 2, Channels: 4, Samples: 6,
				Waveform: spikeWave(s0+2, 24, false)}, tetrodeWant("Python_Processor-101.sim/Tetrode_1/", "Python Processor", 101))
			f.add(b, pipeline.Spike{Processor: 101, Electrode: "probe A/shank 1", SampleNumber: s0 + 1, SortedID: 65535, Channels: 2, Samples: 5,
				Waveform: spikeWave(s0+3, 10, false)}, undescribed("probe A/shank 1", "Python_Processor-101.sim/probe_A_shank_1/", "Python Processor", 101, 2, 5))
		}
		switch k {
		case 9: // the same electrode with another shape: a folder of its own
			f.add(b, pipeline.Spike{Processor: 101, Electrode: "probe A/shank 1", SampleNumber: s0 + 2, SortedID: 3, Channels: 2, Samples: 6,
				Waveform: spikeWave(s0+4, 12, false)}, undescribed("probe A/shank 1", "Python_Processor-101.sim/probe_A_shank_1_2x6/", "Python Processor", 101, 2, 6))
		case 10: // a name whose folder name is taken
			f.add(b, pipeline.Spike{Processor: 101, Electrode: "Tetrode_1", SampleNumber: s0 + 3, SortedID: 9, Channels: 4, Samples: 6,
				Waveform: spikeWave(s0+5, 24, false)}, undescribed("Tetrode_1", "Python_Processor-101.sim/Tetrode_1_2/", "Python Processor", 101, 4, 6))
		case 11: // an electrode the detector's description lacks, late
			f.add(b, pipeline.Spike{Processor: 105, Electrode: "..", SampleNumber: s0, SortedID: 4, Channels: 1, Samples: 3,
				Waveform: spikeWave(s0+6, 3, false)}, undescribed("..", "Spike_Detector-105.sim/electrode/", "Spike Detector", 105, 1, 3))
		case 3: // dropped: an unknown processor, a malformed waveform, no name
			f.add(b, pipeline.Spike{Processor: 999, Electrode: "x", SampleNumber: s0, Channels: 1, Samples: 2, Waveform: []float32{1, 2}}, nil)
			f.add(b, pipeline.Spike{Processor: 105, Electrode: "Tetrode 1", SampleNumber: s0, Channels: 4, Samples: 6, Waveform: make([]float32, 23)}, nil)
			f.add(b, pipeline.Spike{Processor: 101, SampleNumber: s0, Channels: 1, Samples: 1, Waveform: []float32{1}}, nil)
		}
		f.blocks = append(f.blocks, b)
	}
}

// spikeReadScript reads the spikes of each recording folder given (argv[1]
// is a JSON list) twice: with numpy against the format page, and with
// open-ephys-python-tools' loading logic for GUI version >= 0.6 (as in its
// analysis/formats/BinaryRecording.py, Spikes.__init__), re-implemented
// here because Debian does not package it.
const spikeReadScript = `
import sys, os, json
import numpy as np

class ToolsSpikes:
    # open-ephys-python-tools BinaryRecording.Spikes, version >= 0.6
    def __init__(self, info, base_directory, version):
        self.metadata = {}
        self.metadata['name'] = info['name']
        self.metadata['stream_name'] = info['stream_name']
        self.metadata['sample_rate'] = info['sample_rate']
        self.metadata['num_channels'] = info['num_channels']
        assert version >= 0.6, version
        directory = os.path.join(base_directory, 'spikes', info['folder'])
        self.sample_numbers = np.load(os.path.join(directory, 'sample_numbers.npy'), mmap_mode='r')
        self.timestamps = np.load(os.path.join(directory, 'timestamps.npy'), mmap_mode='r')
        self.electrodes = np.load(os.path.join(directory, 'electrode_indices.npy'), mmap_mode='r') - 1
        self.waveforms = np.load(os.path.join(directory, 'waveforms.npy')).astype('float64')
        self.clusters = np.load(os.path.join(directory, 'clusters.npy'), mmap_mode='r')
        if self.waveforms.ndim == 2:
            self.waveforms = np.expand_dims(self.waveforms, 1)
        self.waveforms *= float(info['source_channels'][0]['bit_volts'])

out = {}
for rec in json.loads(sys.argv[1]):
    info = json.load(open(os.path.join(rec, 'structure.oebin')))
    version = float('.'.join(info['GUI version'].split('.')[:2]))
    electrodes = []
    for e in info['spikes']:
        d = os.path.join(rec, 'spikes', e['folder'])
        arrays = {n: np.load(os.path.join(d, n + '.npy')) for n in
                  ('waveforms', 'sample_numbers', 'timestamps', 'electrode_indices', 'clusters')}
        t = ToolsSpikes(e, rec, version)
        electrodes.append({
            'oebin': e,
            'dtypes': {n: a.dtype.str for n, a in arrays.items()},
            'shapes': {n: list(a.shape) for n, a in arrays.items()},
            'sample_numbers': arrays['sample_numbers'].tolist(),
            'timestamps_exact': bool((arrays['timestamps'] == arrays['sample_numbers'] / e['sample_rate']).all()),
            'electrode_indices': arrays['electrode_indices'].tolist(),
            'clusters': arrays['clusters'].tolist(),
            'waveforms': arrays['waveforms'].ravel().tolist(),
            'tools': {
                'metadata': t.metadata,
                'electrodes': t.electrodes.tolist(),
                'waveforms_uv': t.waveforms.ravel().tolist(),
                'waveforms_shape': list(t.waveforms.shape),
                'sample_numbers': t.sample_numbers.tolist(),
                'clusters': t.clusters.tolist(),
            },
        })
    dirs = []
    for root, subdirs, files in os.walk(os.path.join(rec, 'spikes')):
        if files:
            dirs.append(os.path.relpath(root, os.path.join(rec, 'spikes')) + '/')
    out[rec] = {'electrodes': electrodes, 'dirs': sorted(dirs)}
print(json.dumps(out))
`

type readSpike struct {
	Oebin struct {
		Name                string  `json:"name"`
		Description         *string `json:"description"`
		Identifier          *string `json:"identifier"`
		SourceProcessorID   int     `json:"source_processor_id"`
		SourceProcessorName string  `json:"source_processor_name"`
		StreamName          string  `json:"stream_name"`
		SampleRate          float64 `json:"sample_rate"`
		NumChannels         int     `json:"num_channels"`
		PrePeak             int     `json:"pre_peak_samples"`
		PostPeak            int     `json:"post_peak_samples"`
		Folder              string  `json:"folder"`
		SourceChannels      []struct {
			Name       string  `json:"name"`
			LocalIndex int     `json:"local_index"`
			BitVolts   float64 `json:"bit_volts"`
		} `json:"source_channels"`
	} `json:"oebin"`
	Dtypes           map[string]string  `json:"dtypes"`
	Shapes           map[string][]int64 `json:"shapes"`
	SampleNumbers    []int64            `json:"sample_numbers"`
	TimestampsExact  bool               `json:"timestamps_exact"`
	ElectrodeIndices []int              `json:"electrode_indices"`
	Clusters         []int              `json:"clusters"`
	Waveforms        []int16            `json:"waveforms"`
	Tools            struct {
		Metadata struct {
			Name        string  `json:"name"`
			StreamName  string  `json:"stream_name"`
			SampleRate  float64 `json:"sample_rate"`
			NumChannels int     `json:"num_channels"`
		} `json:"metadata"`
		Electrodes     []int     `json:"electrodes"`
		WaveformsUV    []float64 `json:"waveforms_uv"`
		WaveformsShape []int64   `json:"waveforms_shape"`
		SampleNumbers  []int64   `json:"sample_numbers"`
		Clusters       []int     `json:"clusters"`
	} `json:"tools"`
}

type readRecording struct {
	Electrodes []readSpike `json:"electrodes"`
	Dirs       []string    `json:"dirs"`
}

func readSpikes(t *testing.T, recs ...string) map[string]readRecording {
	t.Helper()
	list, _ := json.Marshal(recs)
	var out map[string]readRecording
	runPython(t, spikeReadScript, &out, string(list))
	return out
}

// checkSpikes compares what the readers saw in one recording with the
// electrodes expected, listed all or only the first n of them.
func checkSpikes(t *testing.T, got readRecording, want []*wantElectrode, counts []int) {
	t.Helper()
	if len(got.Electrodes) != len(want) {
		var names []string
		for _, e := range got.Electrodes {
			names = append(names, e.Oebin.Folder)
		}
		t.Fatalf("structure.oebin lists %d electrodes %v, want %d", len(got.Electrodes), names, len(want))
	}
	var dirs []string
	for i, w := range want {
		g := got.Electrodes[i]
		n := len(w.SampleNumbers)
		if counts != nil {
			n = counts[i]
		}
		dirs = append(dirs, w.Folder)
		o := g.Oebin
		where := w.Folder
		if o.Name != w.Name || o.Folder != w.Folder || o.SourceProcessorID != w.Proc || o.SourceProcessorName != w.ProcName ||
			o.StreamName != "sim" || o.SampleRate != 30000 || o.NumChannels != w.Channels || o.PrePeak != w.Pre ||
			o.PostPeak != w.Samples-w.Pre || o.Description == nil || o.Identifier == nil {
			t.Errorf("%s: oebin entry %+v, want %+v", where, o, w)
		}
		var names []string
		var local []int
		for _, c := range o.SourceChannels {
			names = append(names, c.Name)
			local = append(local, c.LocalIndex)
			if c.BitVolts != w.BitVolts {
				t.Errorf("%s: source channel bit_volts %v, want %v", where, c.BitVolts, w.BitVolts)
			}
		}
		if !reflect.DeepEqual(names, w.SourceNames) || !reflect.DeepEqual(local, w.LocalIndex) {
			t.Errorf("%s: source channels %v %v, want %v %v", where, names, local, w.SourceNames, w.LocalIndex)
		}
		wantDtypes := map[string]string{"waveforms": "<i2", "sample_numbers": "<i8", "timestamps": "<f8", "electrode_indices": "<u2", "clusters": "<u2"}
		if !reflect.DeepEqual(g.Dtypes, wantDtypes) {
			t.Errorf("%s: dtypes %v", where, g.Dtypes)
		}
		wantShapes := map[string][]int64{"waveforms": {int64(n), int64(w.Channels), int64(w.Samples)}, "sample_numbers": {int64(n)},
			"timestamps": {int64(n)}, "electrode_indices": {int64(n)}, "clusters": {int64(n)}}
		if !reflect.DeepEqual(g.Shapes, wantShapes) {
			t.Errorf("%s: shapes %v, want %v", where, g.Shapes, wantShapes)
		}
		per := w.Channels * w.Samples
		idx := make([]int, n)
		tools := make([]int, n)
		for k := range idx {
			idx[k] = w.Index
			tools[k] = w.Index - 1
		}
		if !reflect.DeepEqual(g.SampleNumbers, w.SampleNumbers[:n]) || !g.TimestampsExact ||
			!reflect.DeepEqual(g.ElectrodeIndices, idx) || !reflect.DeepEqual(g.Clusters, w.Clusters[:n]) ||
			!reflect.DeepEqual(g.Waveforms, w.Waves[:n*per]) {
			t.Errorf("%s: read back\n sample numbers %v\n electrode indices %v\n clusters %v\n waveforms %v\nwant\n %v\n index %d\n %v\n %v",
				where, g.SampleNumbers, g.ElectrodeIndices, g.Clusters, g.Waveforms, w.SampleNumbers[:n], w.Index, w.Clusters[:n], w.Waves[:n*per])
		}
		// open-ephys-python-tools: metadata, 0-based electrode index (the
		// position in structure.oebin's list), waveforms in µV.
		tm := g.Tools.Metadata
		if tm.Name != w.Name || tm.StreamName != "sim" || tm.SampleRate != 30000 || tm.NumChannels != w.Channels ||
			!reflect.DeepEqual(g.Tools.Electrodes, tools) || !reflect.DeepEqual(g.Tools.SampleNumbers, w.SampleNumbers[:n]) ||
			!reflect.DeepEqual(g.Tools.Clusters, w.Clusters[:n]) ||
			!reflect.DeepEqual(g.Tools.WaveformsShape, []int64{int64(n), int64(w.Channels), int64(w.Samples)}) {
			t.Errorf("%s: open-ephys-python-tools sees %+v", where, g.Tools)
		}
		for k, v := range g.Tools.WaveformsUV {
			if want := float64(w.Waves[k]) * w.BitVolts; math.Abs(v-want) > 1e-9 {
				t.Errorf("%s: open-ephys-python-tools waveform value %d = %v µV, want %v", where, k, v, want)
				break
			}
		}
	}
	sort.Strings(dirs)
	if !reflect.DeepEqual(got.Dirs, dirs) {
		t.Errorf("folders under spikes/ %v, want %v", got.Dirs, dirs)
	}
}

// TestSpikesReadBack records detector and Python spikes in two recordings
// and reads them back with numpy (against the format page) and with
// open-ephys-python-tools' loading logic: every value, the layout, the
// structure.oebin entries, safe and unique folder names, a folder per
// waveform shape, dropped spikes counted; neo still reads the recording.
func TestSpikesReadBack(t *testing.T) {
	parent := t.TempDir()
	s := NewSession(parent, 0, func() time.Time { return time.Date(2024, 3, 5, 14, 7, 9, 0, time.UTC) })
	r1, _ := s.Next()
	r2, _ := s.Next()
	f1, f2 := newSpikeFeed(), newSpikeFeed()
	makeSpikeFeed(f1, r1, 0, 14)
	makeSpikeFeed(f2, r2, 600, 3)
	rec, err := NewRecorder(Config{Stream: testStream(), EventChannels: []EventChannel{pythonChannel}, SpikeSources: spikeSources,
		CheckpointInterval: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range append(f1.blocks, f2.blocks...) {
		if err := rec.Consume(b); err != nil {
			t.Fatal(err)
		}
	}
	if err := rec.End(); err != nil {
		t.Fatal(err)
	}
	st := rec.Stats()
	spikes := 0
	for _, f := range []*spikeFeed{f1, f2} {
		for _, e := range f.electrodes {
			spikes += len(e.SampleNumbers)
		}
	}
	if st.Spikes != uint64(spikes) || st.DroppedSpikes != uint64(f1.dropped+f2.dropped) || f1.dropped != 3 {
		t.Errorf("stats: %d spikes, %d dropped; want %d, %d", st.Spikes, st.DroppedSpikes, spikes, f1.dropped+f2.dropped)
	}
	if f1.nans == 0 || st.NaNSamples < uint64(f1.nans) {
		t.Errorf("NaN waveform values: stats say %d, the feed has %d", st.NaNSamples, f1.nans)
	}
	if len(f1.electrodes) != 7 || len(f2.electrodes) != 4 {
		t.Fatalf("feed: %d and %d electrodes", len(f1.electrodes), len(f2.electrodes))
	}
	p1, p2 := RecordingPath(r1, DefaultRecordNodeID), RecordingPath(r2, DefaultRecordNodeID)
	got := readSpikes(t, p1, p2)
	checkSpikes(t, got[p1], f1.electrodes, nil)
	checkSpikes(t, got[p2], f2.electrodes, nil)

	// neo 0.11 does not read spikes: a recording with them opens as one
	// without, with every sample.
	var neo struct {
		SpikeChannels int   `json:"spike_channels"`
		Sizes         []int `json:"sizes"`
	}
	runPython(t, `
import sys, json
from neo.rawio.openephysbinaryrawio import OpenEphysBinaryRawIO
io = OpenEphysBinaryRawIO(dirname=sys.argv[1])
io.parse_header()
print(json.dumps({'spike_channels': len(io.header['spike_channels']),
                  'sizes': [io.get_signal_size(0, s, 0) for s in range(io.header['nb_segment'][0])]}))
`, &neo, s.Dir())
	if neo.SpikeChannels != 0 || !reflect.DeepEqual(neo.Sizes, []int{14 * blockSamples, 3 * blockSamples}) {
		t.Errorf("neo sees %+v", neo)
	}
}

// TestSpikesCheckpointed: while a recording is open, each checkpoint
// leaves every electrode folder readable, its five files of one length
// (what recording.Recover and the readers need), and structure.oebin
// listing exactly the electrodes that hold spikes on disk.
func TestSpikesCheckpointed(t *testing.T) {
	s := NewSession(t.TempDir(), 0, nil)
	r1, _ := s.Next()
	f := newSpikeFeed()
	makeSpikeFeed(f, r1, 0, 12)
	rec, err := NewRecorder(Config{Stream: testStream(), EventChannels: []EventChannel{pythonChannel}, SpikeSources: spikeSources,
		CheckpointInterval: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	defer rec.End()
	path := RecordingPath(r1, DefaultRecordNodeID)
	consumed := 0
	for _, upto := range []int{1, 2, 12} {
		for ; consumed < upto; consumed++ {
			if err := rec.Consume(f.blocks[consumed]); err != nil {
				t.Fatal(err)
			}
		}
		// The electrodes with spikes in the blocks consumed, and how many.
		var want []*wantElectrode
		var counts []int
		for _, e := range f.electrodes {
			n := 0
			for _, bi := range e.Blocks {
				if bi < upto {
					n++
				}
			}
			if n > 0 {
				want = append(want, e)
				counts = append(counts, n)
			}
		}
		got := readSpikes(t, path)[path]
		checkSpikes(t, got, want, counts)
		if t.Failed() {
			t.Fatalf("after %d blocks", upto)
		}
	}
}

// TestConsumeSpikesDoesNotAllocate: recording spikes, checkpoints
// included, allocates nothing per block once each electrode has its files.
func TestConsumeSpikesDoesNotAllocate(t *testing.T) {
	rec, b := hotPathRecorder(t, 8, time.Millisecond)
	defer rec.End()
	wave := spikeWave(1, 4*40, false)
	names := []string{"Tetrode 1", "Tetrode 2", "Tetrode 3"}
	var first int64
	consume := func() {
		b.FirstSample = first
		b.Events = b.Events[:0]
		b.Spikes = b.Spikes[:0]
		for i, name := range names {
			b.Spikes = append(b.Spikes, pipeline.Spike{Processor: 101, Electrode: name, SampleNumber: first + int64(i),
				SortedID: i, Channels: 4, Samples: 40, Waveform: wave})
		}
		if err := rec.Consume(b); err != nil {
			t.Fatal(err)
		}
		first += blockSamples
	}
	for i := 0; i < 2000; i++ {
		consume()
	}
	allocs := testing.AllocsPerRun(2000, consume)
	if allocs != 0 {
		t.Errorf("Consume with spikes allocates %v times per block in steady state", allocs)
	}
	if st := rec.Stats(); st.Spikes != 3*4001 || st.Checkpoints < 2 {
		t.Errorf("stats %+v", st)
	}
}

// TestSpikeSourceErrors: a description that cannot be right is refused
// with what is wrong and where.
func TestSpikeSourceErrors(t *testing.T) {
	cases := []struct {
		src  SpikeSource
		want string
	}{
		{SpikeSource{ProcessorID: 105, ProcessorName: "Spike.Detector"}, "contains '.'"},
		{SpikeSource{ProcessorID: 101, ProcessorName: "Spike Detector"}, `processor id 101 is already "Python Processor"'s`},
		{SpikeSource{ProcessorID: 105, ProcessorName: "Spike Detector", Electrodes: []Electrode{{Name: "", Channels: []int{0}}}}, "electrode 1 (\"\"): the electrode has no name"},
		{SpikeSource{ProcessorID: 105, ProcessorName: "Spike Detector", Electrodes: []Electrode{{Name: "T", Channels: nil}}}, "no channels"},
		{SpikeSource{ProcessorID: 105, ProcessorName: "Spike Detector", Electrodes: []Electrode{{Name: "T", Channels: []int{4}}}}, "channel index 4 is outside the stream's 4 channels (indices are 0-based)"},
		{SpikeSource{ProcessorID: 105, ProcessorName: "Spike Detector", Electrodes: []Electrode{{Name: "T", Channels: []int{0}, PrePeakSamples: -1}}}, "pre_peak_samples -1"},
		{SpikeSource{ProcessorID: 105, ProcessorName: "Spike Detector", Electrodes: []Electrode{{Name: "T", Channels: []int{0}}, {Name: "T", Channels: []int{1}}}}, "electrode 2 (\"T\"): the name is used twice"},
	}
	for _, c := range cases {
		_, err := NewRecorder(Config{Stream: testStream(), EventChannels: []EventChannel{pythonChannel}, SpikeSources: []SpikeSource{c.src}})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: error %v, want one containing %q", c.src, err, c.want)
		}
	}
}

func TestElectrodeFolderName(t *testing.T) {
	cases := map[string]string{
		"Tetrode 1":             "Tetrode_1",
		"probe A/shank 1":       "probe_A_shank_1",
		`a\b:c*d?e"f<g>h|i`:     "a_b_c_d_e_f_g_h_i",
		"tab\there\x00\x7f":     "tab_here__",
		"..":                    "electrode",
		".":                     "electrode",
		"électrode ß":           "électrode_ß",
		"ok.name-1":             "ok.name-1",
		strings.Repeat("é", 60): strings.Repeat("é", 50),
		"bad\xffutf8":           "bad_utf8",
	}
	for in, want := range cases {
		if got := electrodeFolderName(in); got != want {
			t.Errorf("electrodeFolderName(%q) = %q, want %q", in, got, want)
		}
	}
	if got := electrodeFolderName(strings.Repeat("x", 300)); len(got) != maxElectrodeFolder {
		t.Errorf("a 300-byte name gives a %d-byte folder", len(got))
	}
	if filepath.Base(electrodeFolderName("a/../../b")) != "a_.._.._b" {
		t.Error("a name with '/' and '..' must stay one folder")
	}
}
