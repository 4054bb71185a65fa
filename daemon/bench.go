package daemon

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/pipeline"
	"github.com/ephysd/ephysd/pyrt"
)

const passThroughModule = `class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        pass
    def process(self, data):
        pass
`

// benchCommand prints the figures of docs/performance.md, all measured in
// this one run.
func benchCommand(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("ephysd bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	examples := fs.String("examples", "examples", "folder holding bandpass_filter.py")
	seconds := fs.Float64("seconds", 10, "seconds of 384-channel data per process run")
	calls := fs.Int("calls", 20000, "Python calls for the overhead figure")
	if err := fs.Parse(args); err != nil {
		return err
	}
	bandpass, err := filepath.Abs(filepath.Join(*examples, "bandpass_filter.py"))
	if err != nil {
		return err
	}
	if _, err := os.Stat(bandpass); err != nil {
		return fmt.Errorf("bench: %s not found (run from the repository root or pass --examples)", bandpass)
	}
	tmp, err := os.MkdirTemp("", "ephysd-bench")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	pass := filepath.Join(tmp, "passthrough.py")
	if err := os.WriteFile(pass, []byte(passThroughModule), 0o644); err != nil {
		return err
	}
	log := zap.NewNop()
	rt, err := pyrt.Start(pyrt.Config{Log: log})
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "ephysd bench — %s, %d CPUs, Python %s, numpy %s\n\n", runtime.GOARCH, runtime.NumCPU(), rt.Interpreter().Version, rt.NumpyVersion())

	for _, shape := range [][2]int{{32, 30}, {384, 30}} {
		p50, p99, max, err := callOverhead(rt, pass, shape[0], shape[1], *calls)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "Go→Python call, empty process(), %d ch × %d samples: p50 %s  p99 %s  max %s  (%d calls)\n",
			shape[0], shape[1], fmtDur(p50), fmtDur(p99), fmtDur(max), *calls)
	}

	allocs, blocks, err := hotPathAllocs(tmp, pass)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "Go allocations per block, sim → Python → recorder, 32 ch: %.4f (%d blocks)\n\n", allocs, blocks)

	for _, m := range []struct{ name, path string }{{"pass-through", pass}, {"bandpass_filter.py", bandpass}} {
		c, err := benchProcess(filepath.Join(tmp, "rec"), m.path, 384, 30000, *seconds, log)
		if err != nil {
			return err
		}
		st := c.Runner.Stats()
		h := c.Runner.StageTime(0)
		fmt.Fprintf(stdout, "ephysd process, 384 ch × 30 kHz, %s, recording: %.1f× real time  (python p50 %s p99 %s per 1 ms block; %d blocks, %d overruns)\n",
			m.name, float64(st.Samples)/30000/c.Elapsed().Seconds(), fmtDur(h.Quantile(0.5)), fmtDur(h.Quantile(0.99)), st.Processed, st.OverrunBlocks)
		os.RemoveAll(filepath.Join(tmp, "rec"))
	}
	return nil
}

// callOverhead times Stage.Process on the interpreter thread for a module
// whose process does nothing: the cost of a block's trip into Python and
// back, including the zero-copy array.
func callOverhead(rt *pyrt.Runtime, module string, channels, samples, n int) (p50, p99, max time.Duration, err error) {
	st, err := rt.NewStage(pyrt.StageConfig{ID: 900 + channels, Name: fmt.Sprintf("bench%d", channels), Path: module, Channels: channels, SampleRate: 30000})
	if err != nil {
		return 0, 0, 0, err
	}
	pool, err := pipeline.NewPool(1, channels, samples)
	if err != nil {
		return 0, 0, 0, err
	}
	defer pool.Close(st.Retained())
	b := pool.TryGet()
	defer b.Release()
	var h pipeline.Histogram
	rt.Do(func() {
		st.StartAcquisition()
		for i := 0; i < n/10; i++ { // warm up
			st.Process(b)
		}
		for i := 0; i < n; i++ {
			t0 := time.Now()
			st.Process(b)
			h.Record(time.Since(t0))
		}
		st.StopAcquisition()
	})
	return h.Quantile(0.5), h.Quantile(0.99), h.Max(), nil
}

// hotPathAllocs counts Go heap allocations per block over a steady run of
// the full chain (sim, a Python stage, the recorder).
func hotPathAllocs(tmp, module string) (float64, uint64, error) {
	cfg, err := ParseConfig(filepath.Join(tmp, "bench.toml"), []byte(fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
channels = 32
realtime = false
[[stage]]
module = %q
[recording]
parent_directory = "allocs"
`, module)))
	if err != nil {
		return 0, 0, err
	}
	c, err := NewChain(cfg, zap.NewNop())
	if err != nil {
		return 0, 0, err
	}
	if _, err := c.StartRecording(); err != nil {
		return 0, 0, err
	}
	if err := c.Start(); err != nil {
		return 0, 0, err
	}
	defer os.RemoveAll(filepath.Join(tmp, "allocs"))
	time.Sleep(500 * time.Millisecond) // past start-up
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	b0 := c.Runner.Stats().Processed
	time.Sleep(2 * time.Second)
	runtime.ReadMemStats(&m1)
	b1 := c.Runner.Stats().Processed
	if err := c.Stop(); err != nil {
		return 0, 0, err
	}
	if b1 == b0 {
		return 0, 0, errors.New("bench: no blocks went through the chain")
	}
	return float64(m1.Mallocs-m0.Mallocs) / float64(b1-b0), b1 - b0, nil
}

func benchProcess(out, module string, channels int, rate, seconds float64, log *zap.Logger) (*Chain, error) {
	cfg, err := ParseConfig(filepath.Join(out, "bench.toml"), []byte(fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
channels = %d
rate = %d
realtime = false
[[stage]]
module = %q
[recording]
parent_directory = %q
`, channels, int(rate), module, out)))
	if err != nil {
		return nil, err
	}
	return Process(context.Background(), cfg, log, time.Duration(seconds*float64(time.Second)), nil)
}
