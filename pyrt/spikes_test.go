package pyrt

import (
	"fmt"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/ephysd/ephysd/pipeline"
)

// acquiringStage loads a module as a stage that is acquiring (so that what
// add_python_spike queues is kept), with 2 channels at 30 kHz.
func acquiringStage(t *testing.T, name, src string) *Stage {
	t.Helper()
	s := newStage(t, writeModule(t, "", name, src), 2)
	testRT.Do(func() { s.StartAcquisition() })
	t.Cleanup(func() { testRT.Do(func() { s.StopAcquisition() }) })
	return s
}

// poolBlock returns a pooled block of 2 channels × samples from sample first.
func poolBlock(t *testing.T, samples int, first int64) *pipeline.Block {
	t.Helper()
	pool, err := pipeline.NewPool(1, 2, samples)
	if err != nil {
		t.Fatal(err)
	}
	b := pool.TryGet()
	b.FirstSample = first
	t.Cleanup(func() {
		b.Release()
		pool.Close(true)
	})
	return b
}

func checkPython(t *testing.T, s *Stage, src string) {
	t.Helper()
	if err := testRT.RunString(fmt.Sprintf("import sys\nm = sys.modules[%q]\n", s.modname) + src); err != nil {
		t.Fatal(err)
	}
}

// Every bad argument raises TypeError or ValueError naming the argument
// and saying what is accepted, and queues nothing; the stage keeps running.
func TestAddPythonSpikeRejectsBadArguments(t *testing.T) {
	s := acquiringStage(t, "spike_args.py", `
import numpy as np
results = []
W = np.zeros((2, 4), dtype=np.float32)
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.p = processor
    def process(self, data):
        first = self.p.sample_number
        n = data.shape[1]
        cases = [
            ("name int", lambda: self.p.add_python_spike(3, first, 0, W)),
            ("name empty", lambda: self.p.add_python_spike("", first, 0, W)),
            ("name long", lambda: self.p.add_python_spike("x" * 256, first, 0, W)),
            ("name nul", lambda: self.p.add_python_spike("a\0b", first, 0, W)),
            ("sample float", lambda: self.p.add_python_spike("e", float(first), 0, W)),
            ("sample bool", lambda: self.p.add_python_spike("e", True, 0, W)),
            ("sample after block", lambda: self.p.add_python_spike("e", first + n, 0, W)),
            ("sample too early", lambda: self.p.add_python_spike("e", first - 30001, 0, W)),
            ("sample huge", lambda: self.p.add_python_spike("e", 2**70, 0, W)),
            ("sorted negative", lambda: self.p.add_python_spike("e", first, -1, W)),
            ("sorted big", lambda: self.p.add_python_spike("e", first, 65536, W)),
            ("sorted str", lambda: self.p.add_python_spike("e", first, "1", W)),
            ("wave 1-D", lambda: self.p.add_python_spike("e", first, 0, np.zeros(4))),
            ("wave 3-D", lambda: self.p.add_python_spike("e", first, 0, np.zeros((1, 2, 4)))),
            ("wave empty", lambda: self.p.add_python_spike("e", first, 0, np.zeros((2, 0)))),
            ("wave huge", lambda: self.p.add_python_spike("e", first, 0, np.zeros((2, 40000)))),
            ("wave text", lambda: self.p.add_python_spike("e", first, 0, [["a", "b"]])),
            ("wave object", lambda: self.p.add_python_spike("e", first, 0, object())),
            ("wave none, no spike", lambda: self.p.add_python_spike("Tetrode 9", first, 0)),
            ("missing args", lambda: self.p.add_python_spike("e", first)),
            ("unknown keyword", lambda: self.p.add_python_spike("e", first, 0, W, channel=3)),
        ]
        for name, call in cases:
            try:
                call()
                results.append((name, None, ""))
            except Exception as e:
                results.append((name, type(e).__name__, str(e)))
`)
	b := poolBlock(t, 30, 60000)
	testRT.Do(func() { s.Process(b) })
	if len(b.Spikes) != 0 {
		t.Fatalf("bad calls queued spikes: %+v", b.Spikes)
	}
	if st := s.Status(); st.State != "running" || st.Errors != 0 {
		t.Fatalf("status %+v", st)
	}
	checkPython(t, s, `
want = {
    "name int": ("TypeError", "electrode_name must be a str, got int"),
    "name empty": ("ValueError", "electrode_name '' must be 1 to 255 bytes"),
    "name long": ("ValueError", "must be 1 to 255 bytes"),
    "name nul": ("ValueError", "without NUL"),
    "sample float": ("TypeError", "sample_number must be an int, got float"),
    "sample bool": ("TypeError", "sample_number must be an int, got bool"),
    "sample after block": ("ValueError", "sample_number 60030 is outside [30000, 60030): a spike's sample must lie in the current block [60000, 60030) or at most 30000 samples (1 s) before it"),
    "sample too early": ("ValueError", "sample_number 29999 is outside [30000, 60030)"),
    "sample huge": ("ValueError", "sample_number does not fit in 64 bits"),
    "sorted negative": ("ValueError", "sorted_id must be 0..65535 (recorded as uint16 in clusters.npy), got -1"),
    "sorted big": ("ValueError", "sorted_id must be 0..65535"),
    "sorted str": ("TypeError", "sorted_id must be an int, got str"),
    "wave 1-D": ("ValueError", "waveform must be 2-D (channels, samples), got 1 dimension (for one channel pass waveform[numpy.newaxis, :])"),
    "wave 3-D": ("ValueError", "waveform must be 2-D (channels, samples), got 3 dimensions"),
    "wave empty": ("ValueError", "waveform has shape (2, 0): it needs 1 or more channels and samples"),
    "wave huge": ("ValueError", "at most 65536 values"),
    "wave text": ("TypeError", "waveform must be an array of numbers of shape (channels, samples) that converts to float32"),
    "wave object": ("TypeError", "waveform must be an array of numbers"),
    "wave none, no spike": ("ValueError", "waveform=None takes the waveform of the spike of electrode 'Tetrode 9' at sample 60000 that came with this block, and there is none"),
    "missing args": ("TypeError", "sorted_id"),
    "unknown keyword": ("TypeError", "takes at most 4 arguments"),
}
got = {name: (kind, text) for name, kind, text in m.results}
assert set(got) == set(want), set(got) ^ set(want)
for name, (kind, text) in want.items():
    gk, gt = got[name]
    assert gk == kind and text in gt, (name, gk, gt)
    assert "add_python_spike" in gt, (name, gt)
`)
}

// Valid calls: the spikes are in the block after process, in call order,
// stamped with the stage's id, with the arguments' values and the
// waveform converted to float32 and copied (the script's array is free to
// change afterwards).
func TestAddPythonSpikeValues(t *testing.T) {
	s := acquiringStage(t, "spike_values.py", `
import numpy as np
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.p = processor
    def process(self, data):
        first = self.p.sample_number
        w = np.arange(8, dtype=np.float64).reshape(2, 4) * 1.5 - 3   # float64: converted
        self.p.add_python_spike("Tetrode 1", first, 3, w)
        w[:] = 99                                                     # the spike keeps its copy
        f = np.asfortranarray(np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32))
        self.p.add_python_spike(electrode_name="Electrode/2", sample_number=np.int64(first - 30000),
                                sorted_id=np.uint16(65535), waveform=f)       # Fortran order, numpy ints
        self.p.add_python_spike("é 3", first + data.shape[1] - 1, 0, [[7.25]])  # a list, one value
        big = np.arange(40, dtype=np.float32).reshape(4, 10)
        self.p.add_python_spike("Tetrode 1", first + 5, 1, big[::2, ::3])     # a strided view
`)
	b := poolBlock(t, 30, 60000)
	testRT.Do(func() { s.Process(b) })
	id := s.ID()
	want := []pipeline.Spike{
		{Processor: id, Electrode: "Tetrode 1", SampleNumber: 60000, SortedID: 3, Channels: 2, Samples: 4,
			Waveform: []float32{-3, -1.5, 0, 1.5, 3, 4.5, 6, 7.5}},
		{Processor: id, Electrode: "Electrode/2", SampleNumber: 30000, SortedID: 65535, Channels: 2, Samples: 3,
			Waveform: []float32{1, 2, 3, 4, 5, 6}},
		{Processor: id, Electrode: "é 3", SampleNumber: 60029, SortedID: 0, Channels: 1, Samples: 1,
			Waveform: []float32{7.25}},
		{Processor: id, Electrode: "Tetrode 1", SampleNumber: 60005, SortedID: 1, Channels: 2, Samples: 4,
			Waveform: []float32{0, 3, 6, 9, 20, 23, 26, 29}},
	}
	if !reflect.DeepEqual(b.Spikes, want) {
		t.Fatalf("spikes\n got %+v\nwant %+v", b.Spikes, want)
	}
}

// A spike emitted in handle_spike with waveform=None relabels the spike it
// was given: same electrode, sample and waveform (copied), the new sorted
// id, this stage's id. The given spike stays as it was.
func TestAddPythonSpikeRelabelsWithWaveformNone(t *testing.T) {
	s := acquiringStage(t, "spike_relabel.py", `
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.p = processor
    def handle_spike(self, source_node, electrode_name, num_channels, num_samples, sample_number, sorted_id, spike_data):
        self.p.add_python_spike(electrode_name, sample_number, 4 if spike_data.min() < -50 else 5)
    def process(self, data):
        pass
`)
	b := poolBlock(t, 30, 1000)
	detector := []pipeline.Spike{
		{Processor: 105, Electrode: "Stereotrode 1", ElectrodeIndex: 2, SampleNumber: 990, Channels: 2, Samples: 3,
			Waveform: []float32{-10, -80, -20, 5, -30, 1}},
		{Processor: 105, Electrode: "Stereotrode 2", ElectrodeIndex: 3, SampleNumber: 1010, Channels: 2, Samples: 3,
			Waveform: []float32{-1, -2, -3, -4, -5, -6}},
	}
	b.Spikes = append(b.Spikes, detector...)
	testRT.Do(func() { s.Process(b) })
	want := append(append([]pipeline.Spike(nil), detector...),
		pipeline.Spike{Processor: s.ID(), Electrode: "Stereotrode 1", ElectrodeIndex: 2, SampleNumber: 990, SortedID: 4,
			Channels: 2, Samples: 3, Waveform: []float32{-10, -80, -20, 5, -30, 1}},
		pipeline.Spike{Processor: s.ID(), Electrode: "Stereotrode 2", ElectrodeIndex: 3, SampleNumber: 1010, SortedID: 5,
			Channels: 2, Samples: 3, Waveform: []float32{-1, -2, -3, -4, -5, -6}})
	if !reflect.DeepEqual(b.Spikes, want) {
		t.Fatalf("spikes\n got %+v\nwant %+v", b.Spikes, want)
	}
	if &b.Spikes[2].Waveform[0] == &b.Spikes[0].Waveform[0] {
		t.Fatal("the relabelled spike shares the detector's waveform memory; each spike slot must own its buffer")
	}
}

// spikeCollector keeps a deep copy of every block's spikes.
type spikeCollector struct {
	mu     sync.Mutex
	first  []int64
	spikes [][]pipeline.Spike
}

func (c *spikeCollector) Consume(b *pipeline.Block) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []pipeline.Spike
	for _, sp := range b.Spikes {
		sp.Waveform = append([]float32(nil), sp.Waveform...)
		out = append(out, sp)
	}
	c.first = append(c.first, b.FirstSample)
	c.spikes = append(c.spikes, out)
	return nil
}

func (c *spikeCollector) End() error { return nil }

// Spikes a stage emits reach the next stage's handle_spike with exactly
// their values, before that stage's process of the same block, and then
// the consumers (the recorder); a stage is not handed its own spikes.
func TestSpikesFlowToLaterStageBeforeItsProcess(t *testing.T) {
	emitter := writeModule(t, "", "spike_emitter.py", `
import numpy as np
got = []
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.p = processor
    def handle_spike(self, *args):
        got.append(args)          # must stay empty: no spike comes before this stage
    def process(self, data):
        first = self.p.sample_number
        # one spike per block: channel 1's first two samples, at the block's 3rd sample
        self.p.add_python_spike("Electrode %d" % (first // 20 % 2 + 1), first + 2, first // 20, data[1:2, :2] * -1)
`)
	listener := writeModule(t, "", "spike_listener.py", `
calls = []
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        pass
    def handle_spike(self, source_node, electrode_name, num_channels, num_samples, sample_number, sorted_id, spike_data):
        calls.append(("spike", source_node, electrode_name, num_channels, num_samples, sample_number, sorted_id,
                      spike_data.tolist(), str(spike_data.dtype), spike_data.flags["WRITEABLE"]))
    def process(self, data):
        calls.append(("process",))
`)
	s1 := newStage(t, emitter, 2)
	s2 := newStage(t, listener, 2)
	pool, err := pipeline.NewPool(pipeline.PoolSizeFor(8, false), 2, 20)
	if err != nil {
		t.Fatal(err)
	}
	col := &spikeCollector{}
	r, err := pipeline.NewRunner(pipeline.RunnerConfig{
		Source: &testSource{channels: 2, blocks: 5}, SourceID: 100, Pool: pool,
		Stages: []pipeline.Stage{s1, s2}, Consumers: []pipeline.Consumer{col}, QueueDepth: 8, Backpressure: true,
		Executor: testRT,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	if err := r.Wait(); err != nil {
		t.Fatal(err)
	}
	if len(col.spikes) != 5 {
		t.Fatalf("%d blocks", len(col.spikes))
	}
	for bi, spikes := range col.spikes {
		first := col.first[bi]
		want := []pipeline.Spike{{Processor: s1.ID(), Electrode: fmt.Sprintf("Electrode %d", first/20%2+1),
			SampleNumber: first + 2, SortedID: int(first / 20), Channels: 1, Samples: 2,
			Waveform: []float32{-inputValue(1, first), -inputValue(1, first+1)}}}
		if !reflect.DeepEqual(spikes, want) {
			t.Fatalf("block %d: spikes %+v, want %+v", bi, spikes, want)
		}
	}
	checkPython(t, s1, "assert m.got == [], m.got\n")
	checkPython(t, s2, fmt.Sprintf(`
calls = m.calls
assert len(calls) == 10, calls
for k in range(5):
    first = 20 * k
    spike, proc = calls[2 * k], calls[2 * k + 1]
    assert proc == ("process",), calls
    v = lambda s: -float(1000 + s %% 997)
    assert spike == ("spike", %d, "Electrode %%d" %% (k %% 2 + 1), 1, 2, first + 2, k, [[v(first), v(first + 1)]], "float32", False), spike
`, s1.ID()))
}

// A block whose process raised emits none of the spikes queued in it.
func TestSpikesOfARaisingProcessAreDropped(t *testing.T) {
	s := acquiringStage(t, "spike_raiser.py", `
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.p = processor
    def process(self, data):
        self.p.add_python_spike("e", self.p.sample_number, 0, [[1.0]])
        raise RuntimeError("after queueing a spike")
`)
	b := poolBlock(t, 10, 0)
	testRT.Do(func() { s.Process(b) })
	if len(b.Spikes) != 0 {
		t.Fatalf("spikes of a failed block: %+v", b.Spikes)
	}
	b.Reset()
	b.FirstSample = 10
	testRT.Do(func() { s.Process(b) })
	if len(b.Spikes) != 0 {
		t.Fatalf("spikes of a failed block leaked into the next: %+v", b.Spikes)
	}
}

// More than EPHYS_MAX_SPIKES in one block: the first are kept, the rest
// counted and logged once.
func TestTooManySpikesInOneBlock(t *testing.T) {
	s := acquiringStage(t, "spike_flood.py", `
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.p = processor
    def process(self, data):
        for i in range(1100):
            self.p.add_python_spike("e", self.p.sample_number, i % 7, [[float(i)]])
`)
	b := poolBlock(t, 10, 0)
	testRT.Do(func() { s.Process(b) })
	if len(b.Spikes) != 1024 || b.Spikes[1023].Waveform[0] != 1023 {
		t.Fatalf("%d spikes kept", len(b.Spikes))
	}
	var warned bool
	for _, e := range logsFor(s.Name()) {
		if strings.Contains(e.Message, "too many spikes in one block") {
			warned = e.ContextMap()["dropped"] == int64(76)
		}
	}
	if !warned {
		t.Fatal("no warning with dropped=76")
	}
}

// In steady state (a pooled block used again), emitting spikes allocates
// nothing in Go: waveforms go into the buffers the block's spike slots
// keep, names are interned.
func TestAddPythonSpikeAllocatesNothingPerBlock(t *testing.T) {
	s := acquiringStage(t, "spike_steady.py", `
import numpy as np
W = np.ones((4, 40), dtype=np.float32)
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.p = processor
    def process(self, data):
        for k in range(3):
            self.p.add_python_spike("Tetrode %d" % k, self.p.sample_number, k, W)
`)
	b := poolBlock(t, 30, 0)
	var allocs float64
	testRT.Do(func() {
		allocs = testing.AllocsPerRun(50, func() {
			b.Reset()
			b.FirstSample += 30
			s.Process(b)
		})
	})
	if len(b.Spikes) != 3 || b.Spikes[2].Electrode != "Tetrode 2" || len(b.Spikes[2].Waveform) != 160 {
		t.Fatalf("spikes %+v", b.Spikes)
	}
	if allocs != 0 {
		t.Fatalf("%v allocations per block", allocs)
	}
}
