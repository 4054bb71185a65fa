package daemon

// The isolation part of `ephysd bench`: what running a Python stage in a
// worker process of its own ([[stage]] isolation = "process") costs per
// block, against the same module in ephysd's interpreter.

import (
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/pipeline"
	"github.com/ephysd/ephysd/pyrt"
	"github.com/ephysd/ephysd/pyrt/isolated"
)

// goalIsolationExtra is the most an isolated stage may add per block.
const goalIsolationExtra = 20 * time.Microsecond

// IsolationOptions configure BenchIsolation.
type IsolationOptions struct {
	Runtime  *pyrt.Runtime
	Module   string // a pass-through module
	Channels []int  // default 64 and 384
	Samples  int    // per block (default 30)
	Calls    int    // timed calls per round and side
	Rounds   int    // in process, then isolated, this many times
	Log      *zap.Logger
	Progress io.Writer
}

func (o SuiteOptions) isolationOptions(rt *pyrt.Runtime) IsolationOptions {
	return IsolationOptions{Runtime: rt, Module: o.Modules[0].Path, Channels: []int{64, 384}, Samples: o.PythonSample,
		Calls: o.PythonCalls, Rounds: o.PythonRounds, Log: o.Log, Progress: o.Progress}
}

// IsolationResult compares one block size in process and isolated.
type IsolationResult struct {
	Channels, Samples   int
	Calls               int // per side, all rounds
	InProcess, Isolated CallStats
	// Extra is what isolation adds per block (isolated − in process).
	ExtraMean, ExtraP50, ExtraP99 time.Duration
}

// BenchIsolation times a pass-through module's Process per block in
// ephysd's interpreter (on the interpreter thread, as the pipeline calls
// it) and in a worker process (the shared-memory round trip), alternating
// rounds, over the same blocks.
func BenchIsolation(o IsolationOptions) ([]IsolationResult, error) {
	rt := o.Runtime
	if rt == nil {
		return nil, errors.New("isolation: no runtime")
	}
	if len(o.Channels) == 0 {
		o.Channels = []int{64, 384}
	}
	if o.Samples <= 0 {
		o.Samples = 30
	}
	if o.Calls <= 0 || o.Rounds <= 0 {
		return nil, errors.New("isolation: calls and rounds must be > 0")
	}
	if o.Log == nil {
		o.Log = zap.NewNop()
	}
	warm := min(o.Calls/10+10, 500)
	var out []IsolationResult
	for ci, channels := range o.Channels {
		want := pyrt.StageConfig{ID: 970 + ci, Name: fmt.Sprintf("isolation-%dch", channels), Path: o.Module, Channels: channels, SampleRate: 30000}
		in, err := rt.NewStage(want)
		if err != nil {
			return nil, err
		}
		want.ID += 10
		iso, err := isolated.NewStage(isolated.Config{Stage: want, Command: workerCommand, BlockSamples: o.Samples, Log: o.Log})
		if err != nil {
			if iso != nil {
				iso.Close()
			}
			return nil, err
		}
		pool, err := pipeline.NewPool(1, channels, o.Samples)
		if err != nil {
			iso.Close()
			return nil, err
		}
		b := pool.TryGet()
		const k = 64
		blocks := make([][]float32, k)
		rng := rand.New(rand.NewPCG(3, 4))
		for i := range blocks {
			blocks[i] = make([]float32, channels*o.Samples)
			for j := range blocks[i] {
				blocks[i][j] = float32(rng.NormFloat64() * 30)
			}
		}
		loop := func(st pipeline.Stage, d []time.Duration) {
			for i := 0; i < warm; i++ {
				copy(b.Data, blocks[i%k])
				st.Process(b)
			}
			for i := range d {
				copy(b.Data, blocks[i%k])
				t0 := time.Now()
				st.Process(b)
				d[i] = time.Since(t0)
			}
		}
		var inTimes, isoTimes []time.Duration
		for round := 0; round < o.Rounds; round++ {
			d := make([]time.Duration, o.Calls)
			rt.Do(func() {
				in.StartAcquisition()
				loop(in, d)
				in.StopAcquisition()
			})
			inTimes = append(inTimes, d...)
			d = make([]time.Duration, o.Calls)
			iso.StartAcquisition()
			loop(iso, d)
			iso.StopAcquisition()
			isoTimes = append(isoTimes, d...)
		}
		st, ist := in.Status(), iso.Status()
		restarts := iso.Restarts()
		iso.Close()
		b.Release()
		pool.Close(in.Retained())
		if st.Errors > 0 || ist.Errors > 0 || restarts > 0 {
			return nil, fmt.Errorf("isolation: the pass-through module failed (in process: %s; isolated: %s, %d restarts)", st.LastError, ist.LastError, restarts)
		}
		r := IsolationResult{Channels: channels, Samples: o.Samples, Calls: len(inTimes), InProcess: callStats(inTimes), Isolated: callStats(isoTimes)}
		r.ExtraMean = r.Isolated.Mean - r.InProcess.Mean
		r.ExtraP50 = r.Isolated.P50 - r.InProcess.P50
		r.ExtraP99 = r.Isolated.P99 - r.InProcess.P99
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, "bench: isolation %d ch: in process mean %s, isolated mean %s\n", channels, fmtDur(r.InProcess.Mean), fmtDur(r.Isolated.Mean))
		}
		out = append(out, r)
	}
	return out, nil
}

func isolationTable(rs []IsolationResult) benchTable {
	t := benchTable{
		Title: "Isolated Python stages: one block through a pass-through module, in ephysd's interpreter and in a worker process",
		Header: []string{"channels × samples", "calls", "in process p50", "p99", "mean", "isolated p50", "p99", "mean",
			"extra per block (mean)", "extra (p50)", "extra (p99)"},
	}
	for _, r := range rs {
		t.add(fmt.Sprintf("%d × %d", r.Channels, r.Samples), strconv.Itoa(r.Calls),
			fmtDur(r.InProcess.P50), fmtDur(r.InProcess.P99), fmtDur(r.InProcess.Mean),
			fmtDur(r.Isolated.P50), fmtDur(r.Isolated.P99), fmtDur(r.Isolated.Mean),
			fmtSignedDur(r.ExtraMean), fmtSignedDur(r.ExtraP50), fmtSignedDur(r.ExtraP99))
	}
	t.Note = "Stage.Process timed in Go around the call, on a fresh copy of the block each time (not timed). In process: on the " +
		"interpreter thread, as the pipeline calls it. Isolated ([[stage]] isolation = \"process\"): the block's samples and events " +
		"copied into the worker's shared memory (memfd), an eventfd wakes the worker, which runs the same pyrt stage on a zero-copy " +
		"view of that memory, another eventfd wakes ephysd, the output is copied back. Goal: ≤ 20 µs extra per block."
	return t
}
