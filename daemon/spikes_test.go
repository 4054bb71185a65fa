package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/drivers/sim"
	"github.com/ephysd/ephysd/pipeline/spikedetect"
)

func TestSpikesConfig(t *testing.T) {
	cfg, err := ParseConfig("x.toml", []byte(`
[source.sim]
channels = 16
[spikes]
threshold_uv = 45.0
dead_time_ms = 0.8
[[spikes.electrode]]
channels = [1, 2, 3, 4]
[[spikes.electrode]]
name = "ref"
channels = [9]
threshold_mad = 6.0
polarity = "both"
`))
	if err != nil {
		t.Fatal(err)
	}
	s := cfg.Spikes
	if !s.Enabled() || len(s.Electrodes) != 2 || *s.ThresholdUV != 45 || s.DeadTimeMS != 0.8 || s.WaveformSamples != 40 ||
		s.PrePeakSamples != 8 || s.Polarity != spikedetect.Negative || *s.Electrodes[1].ThresholdMAD != 6 || s.Electrodes[1].Polarity != "both" {
		t.Fatalf("%+v", s)
	}
	cfg, err = ParseConfig("x.toml", []byte("[source.sim]\nchannels = 4\n"))
	if err != nil || cfg.Spikes.Enabled() {
		t.Fatalf("no [spikes]: %v, enabled %v", err, cfg.Spikes.Enabled())
	}

	cases := []struct{ name, doc, want string }{
		{"unknown key", "[spikes]\nthreshold = 5\n", "x.toml:2: spikes.threshold: unknown key"},
		{"unknown electrode key", "[[spikes.electrode]]\nchannels = [1]\nchanel = 2\n", "x.toml:3: spikes.electrode.chanel: unknown key"},
		{"no electrodes", "[spikes]\nthreshold_mad = 5.0\n", "spikes.electrode: no electrodes"},
		{"empty group", "[[spikes.electrode]]\nchannels = [1]\n[[spikes.electrode]]\nchannels = []\n", "x.toml:4: spikes.electrode[2].channels: empty"},
		{"beyond the source", "[source.sim]\nchannels = 8\n[[spikes.electrode]]\nchannels = [7, 8, 9]\n",
			"x.toml:4: spikes.electrode[1].channels[3]: channel 9 does not exist: the source has 8 channels (CH1–CH8)"},
		{"pre ≥ length", "[spikes]\nwaveform_samples = 32\npre_peak_samples = 32\n[[spikes.electrode]]\nchannels = [1]\n",
			"x.toml:3: spikes.pre_peak_samples: 32: must be 0–31, less than waveform_samples = 32"},
		{"duplicate names", "[[spikes.electrode]]\nchannels = [1]\n[[spikes.electrode]]\nname = \"Electrode 1\"\nchannels = [2]\n",
			`x.toml:4: spikes.electrode[2].name: "Electrode 1" is also the name of electrode[1]`},
		{"both thresholds", "[[spikes.electrode]]\nchannels = [1]\nthreshold_uv = 50.0\nthreshold_mad = 5.0\n",
			"x.toml:3: spikes.electrode[1].threshold_uv: set threshold_uv or threshold_mad, not both"},
		{"polarity", "[spikes]\npolarity = \"down\"\n[[spikes.electrode]]\nchannels = [1]\n", `x.toml:2: spikes.polarity: "down"`},
		{"channels as a number", "[[spikes.electrode]]\nchannels = 3\n", "x.toml:2"},
	}
	// Every key out of its range, each error with the key and its line.
	el := "[[spikes.electrode]]\nchannels = [1]\n"
	for key, value := range map[string]string{
		"threshold_uv": "0.0", "threshold_mad": "-2.0", "polarity": `"up"`, "waveform_samples": "1", "pre_peak_samples": "-1",
		"peak_search_samples": "0", "dead_time_ms": "-1.0", "highpass_hz": "nan", "noise_window_s": "0.0",
		"noise_update_s": "1e9", "auto_group": "-1",
	} {
		cases = append(cases, struct{ name, doc, want string }{key, "[spikes]\n" + key + " = " + value + "\n" + el, "x.toml:2: spikes." + key + ": "})
	}
	for key, value := range map[string]string{
		"channels": "[0]", "name": `"a/b"`, "threshold_uv": "-1.0", "threshold_mad": "0.0", "polarity": `"up"`,
	} {
		doc, line := el+el+key+" = "+value+"\n", 5
		if key == "channels" {
			doc, line = el+"[[spikes.electrode]]\nchannels = "+value+"\n", 4
		}
		cases = append(cases, struct{ name, doc, want string }{"electrode " + key, doc, fmt.Sprintf("x.toml:%d: spikes.electrode[2].%s", line, key)})
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseConfig("x.toml", []byte(c.doc))
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want one containing %q", err, c.want)
			}
		})
	}
}

// The spike detector's processor id follows the Python stages and skips
// the record node's.
func TestSpikeDetectorID(t *testing.T) {
	for _, c := range []struct{ stages, node, want int }{{0, 0, 102}, {2, 0, 104}, {1, 102, 103}, {1, 150, 102}} {
		cfg := DefaultConfig()
		cfg.Stages = make([]StageConfig, c.stages)
		cfg.Recording.RecordNodeID = c.node
		if got := spikeDetectorID(&cfg); got != c.want {
			t.Errorf("%d stages, record node %d: id %d, want %d", c.stages, c.node, got, c.want)
		}
	}
}

// spikeModule records every handle_spike call with the types and shapes of
// its arguments, and checks, at each process(data), that the spikes handed
// to it since the last process complete their waveform in this block and
// that each waveform equals the input samples around its peak.
const spikeModule = `
import json, os
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.p = processor
        self.pending = []
        self.spikes = []
        self.waves = []
        self.problems = []
        self.chunks = []
        self.first = None

    def handle_spike(self, source_node, electrode_name, num_channels, num_samples, sample_number, sorted_id, spike_data):
        args = (source_node, electrode_name, num_channels, num_samples, sample_number, sorted_id, spike_data)
        self.pending.append(args)
        self.waves.append(args[:6] + (spike_data.copy(),))
        self.spikes.append({
            "types": [type(a).__name__ for a in args],
            "source_node": source_node, "electrode": electrode_name, "channels": num_channels,
            "samples": num_samples, "sample_number": sample_number, "sorted_id": sorted_id,
            "dtype": str(spike_data.dtype), "shape": list(spike_data.shape),
            "writeable": bool(spike_data.flags["WRITEABLE"]), "c_contiguous": bool(spike_data.flags["C_CONTIGUOUS"]),
        })

    def process(self, data):
        first, n = self.p.sample_number, data.shape[1]
        if self.first is None:
            self.first = first
        self.chunks.append(data.copy())
        for (node, name, nc, ns, sn, sid, wave) in self.pending:
            last = sn - 8 + ns - 1
            if not (first <= last < first + n):
                self.problems.append("spike at %d (last sample %d) handed over before the block [%d, %d)" % (sn, last, first, first + n))
        self.pending = []

    def stop_acquisition(self):
        x = np.concatenate(self.chunks, axis=1)
        chans = {"Tetrode 1": [0, 1, 2, 3], "quiet": [5]}
        # Each waveform against the input samples peak-8 .. peak+31.
        for (node, name, nc, ns, sn, sid, wave) in self.waves:
            at = sn - self.first
            want = x[chans[name], at - 8:at - 8 + ns]
            if not np.array_equal(wave, want):
                self.problems.append("spike at %d: waveform differs from the input by up to %g" % (sn, np.abs(wave - want).max()))
        with open(os.path.join(HERE, "spikes.json"), "w") as f:
            json.dump({"spikes": self.spikes, "problems": self.problems, "first": self.first}, f)
        np.save(os.path.join(HERE, "input.npy"), x)

`

// Planted spikes reach a Python stage's handle_spike, before the process
// of the block that completes their waveform, with exactly the documented
// arguments (int, str, int, int, int, int, float32 (channels, samples)
// read-only), at the planted sample numbers, with waveforms equal to the
// data the stage sees, and the daemon counts them per electrode. Blocks of
// 7 samples: every waveform spans several.
func TestSpikesReachPythonBeforeProcess(t *testing.T) {
	dir := t.TempDir()
	mod := filepath.Join(dir, "spike_args.py")
	if err := os.WriteFile(mod, []byte(spikeModule), 0o644); err != nil {
		t.Fatal(err)
	}
	doc := fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
realtime = false
channels = 8
noise_uv = 5.0
lfp_uv = 0.0
units = 0
plant_channels = [1, 2, 3, 4]
plant_uv = 100.0
plant_rate = 50.0
[pipeline]
block_samples = 7
[spikes]
[[spikes.electrode]]
channels = [1, 2, 3, 4]
[[spikes.electrode]]
name = "quiet"
channels = [6]
[[stage]]
module = %q
[recording]
parent_directory = %q
`, mod, filepath.Join(dir, "rec"))
	const seconds = 2
	c := process(t, doc, seconds*time.Second)
	if st := c.Stages[0].Status(); st.State != "running" || st.Errors != 0 {
		t.Fatalf("stage %+v", st)
	}
	raw, err := os.ReadFile(filepath.Join(dir, "spikes.json"))
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Spikes []struct {
			Types             []string
			SourceNode        int `json:"source_node"`
			Electrode         string
			Channels, Samples int
			SampleNumber      int64 `json:"sample_number"`
			SortedID          int   `json:"sorted_id"`
			Dtype             string
			Shape             []int
			Writeable         bool
			CContiguous       bool `json:"c_contiguous"`
		}
		Problems []string
		First    int64
	}
	if err := json.Unmarshal(raw, &got); err != nil {
		t.Fatal(err)
	}
	for _, p := range got.Problems {
		t.Error(p)
	}
	simCfg := c.Config.Driver.(*sim.Config)
	planted := simCfg.Planted(1024, seconds*int64(simCfg.Rate)-32)
	if len(got.Spikes) != len(planted) || len(planted) < 70 {
		t.Fatalf("handle_spike was called %d times, %d spikes planted", len(got.Spikes), len(planted))
	}
	wantTypes := "int str int int int int ndarray"
	for i, sp := range got.Spikes {
		if strings.Join(sp.Types, " ") != wantTypes {
			t.Fatalf("spike %d: argument types %v, want %s", i, sp.Types, wantTypes)
		}
		if sp.SourceNode != 103 || sp.Electrode != "Tetrode 1" || sp.Channels != 4 || sp.Samples != 40 || sp.SortedID != 0 ||
			sp.Dtype != "float32" || fmt.Sprint(sp.Shape) != "[4 40]" || sp.Writeable || !sp.CContiguous {
			t.Fatalf("spike %d: %+v", i, sp)
		}
		if sp.SampleNumber != planted[i].SampleNumber {
			t.Fatalf("spike %d at sample %d, planted at %d", i, sp.SampleNumber, planted[i].SampleNumber)
		}
	}
	counts := c.spikeCounts()
	if len(counts) != 2 || counts[0] != (ElectrodeSpikes{"Tetrode 1", uint64(len(planted))}) || counts[1].Electrode != "quiet" || counts[1].Spikes > 2 {
		t.Fatalf("counts %+v", counts)
	}
	if n := c.Runner.StageTime(0).Count(); n != c.Runner.Stats().Processed {
		t.Fatalf("the detector's histogram has %d blocks, %d processed", n, c.Runner.Stats().Processed)
	}
	if n := c.PythonStageTime(0).Count(); n != c.Runner.Stats().Processed {
		t.Fatalf("the Python stage's histogram has %d blocks, %d processed", n, c.Runner.Stats().Processed)
	}
	var sum bytes.Buffer
	printSummary(&sum, c)
	if want := fmt.Sprintf("spikes      %d on 2 electrodes", counts[0].Spikes+counts[1].Spikes); !strings.Contains(sum.String(), want) {
		t.Fatalf("summary lacks %q:\n%s", want, sum.String())
	}
}

// The shipped example runs: tetrode 1 detects the spikes planted on it
// (a few more may come from the high-pass's undershoot after them), the
// tetrodes near the units detect theirs.
func TestSpikesExampleConfig(t *testing.T) {
	cfg, err := LoadConfig(filepath.Join("..", "examples", "spikes.toml"))
	if err != nil {
		t.Fatal(err)
	}
	sc := cfg.Driver.(*sim.Config)
	sc.Realtime = false
	cfg.Recording.ParentDirectory = t.TempDir()
	c, err := Process(context.Background(), cfg, zap.NewNop(), 2*time.Second, nil)
	if err != nil {
		t.Fatal(err)
	}
	counts := c.spikeCounts()
	if len(counts) != 8 || counts[0].Electrode != "Tetrode 1" || counts[7].Electrode != "Tetrode 8" {
		t.Fatalf("counts %+v", counts)
	}
	planted := len(sc.Planted(1024, 2*int64(sc.Rate)-32))
	t.Logf("%d planted; %+v", planted, counts)
	if n := int(counts[0].Spikes); n < planted || n > planted+3 {
		t.Errorf("Tetrode 1: %d spikes, %d planted", n, planted)
	}
	var units uint64
	for _, e := range counts[1:] {
		units += e.Spikes
	}
	if units < 10 {
		t.Errorf("%d spikes from the units in 2 s: %+v", units, counts)
	}
	if st := c.Stages[0].Status(); st.State != "running" || st.Errors != 0 {
		t.Fatalf("spike_counter.py: %+v", st)
	}
}

// The service reports the detector's spikes per electrode in /metrics and
// in the status, and the counters survive the end of the acquisition.
func TestSpikeMetricsAndStatus(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "ephysd.toml")
	doc := fmt.Sprintf(`
[source.sim]
channels = 8
realtime = true
lfp_uv = 0.0
units = 0
plant_channels = [5]
plant_rate = 200.0
[spikes]
threshold_uv = 50.0
[[spikes.electrode]]
channels = [1, 2, 3, 4]
[[spikes.electrode]]
channels = [5]
[recording]
parent_directory = %q
[control]
http = ""
`, filepath.Join(dir, "recs"))
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := NewService(cfg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	m := NewMetrics(svc)
	if err := svc.SetMode(Acquire); err != nil {
		t.Fatal(err)
	}
	// 200 spikes per second on channel 5: wait for 20 (a hang guard, not a
	// timing assertion).
	var st Status
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		st = svc.Status()
		if len(st.Spikes) == 2 && st.Spikes[1].Spikes >= 20 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status spikes %+v after 20 s", st.Spikes)
		}
	}
	if st.Spikes[0] != (ElectrodeSpikes{"Tetrode 1", 0}) || st.Spikes[1].Electrode != "Electrode 1" {
		t.Fatalf("status spikes %+v", st.Spikes)
	}
	s := doScrape(t, m)
	during := s.value(t, "ephysd_spikes_total", "electrode", "Electrode 1")
	if during < float64(st.Spikes[1].Spikes) || s.value(t, "ephysd_spikes_total", "electrode", "Tetrode 1") != 0 {
		t.Fatalf("ephysd_spikes_total %v, status %d", during, st.Spikes[1].Spikes)
	}
	if err := svc.SetMode(Idle); err != nil {
		t.Fatal(err)
	}
	after := doScrape(t, m)
	if v := after.value(t, "ephysd_spikes_total", "electrode", "Electrode 1"); v < during {
		t.Fatalf("ephysd_spikes_total went down from %v to %v when acquisition stopped", during, v)
	}
	if len(svc.Status().Spikes) != 0 {
		t.Fatal("spikes in the status while idle")
	}
}
