package daemon

import (
	"fmt"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"github.com/ephysd/ephysd/drivers/sim"
	"github.com/ephysd/ephysd/pipeline"
	"github.com/ephysd/ephysd/pipeline/spikedetect"
)

// SpikesResult is one case of BenchSpikes: the built-in spike detector
// over simulated blocks.
type SpikesResult struct {
	Channels, Samples int     // per block
	HighpassHz        float64 // 0: raw
	Blocks            int     // timed
	SpikesPerSecond   float64
	CPUPerBlock       time.Duration // CPU time of the detecting thread
	WallPerBlock      time.Duration
	AllocsPerBlock    float64
}

// RealTimeShare is the CPU per block over the block's duration at 30 kHz:
// the share of one core the detector takes.
func (r SpikesResult) RealTimeShare() float64 {
	return r.CPUPerBlock.Seconds() / (float64(r.Samples) / 30000)
}

// BenchSpikes times the spike detector (electrodes of 4 channels over the
// whole array at 5×MAD, as `auto_group = 4`) on the simulator's signal with
// planted spikes, on one locked thread, for seconds of data per case:
// 384 channels in 1 ms blocks raw and with the high-pass, and the closed
// loop's 32 channels in 1-sample blocks.
func BenchSpikes(seconds float64) ([]SpikesResult, error) {
	cases := []SpikesResult{
		{Channels: 384, Samples: 30},
		{Channels: 384, Samples: 30, HighpassHz: 300},
		{Channels: 32, Samples: 1},
	}
	for i := range cases {
		if err := benchSpikesOne(&cases[i], seconds); err != nil {
			return cases[:i], err
		}
	}
	return cases, nil
}

func benchSpikesOne(r *SpikesResult, seconds float64) error {
	const rate = 30000
	// 0.4 s of signal, replayed with growing sample numbers.
	n := 12000 / r.Samples
	cfg := sim.DefaultConfig()
	cfg.Channels, cfg.Realtime, cfg.Units = r.Channels, false, r.Channels/10
	cfg.PlantChannels = []int{1, 2, 3, 4, 17, 18, 19, 20}
	cfg.PlantRate = 100
	src, err := sim.New(cfg)
	if err != nil {
		return err
	}
	src.Start()
	defer src.Close()
	pool, err := pipeline.NewPool(n, r.Channels, r.Samples)
	if err != nil {
		return err
	}
	defer pool.Close(false)
	blocks := make([]*pipeline.Block, n)
	for i := range blocks {
		blocks[i] = pool.TryGet()
		if err := src.ReadBlock(blocks[i]); err != nil {
			return err
		}
	}
	defer func() {
		for _, b := range blocks {
			b.Release()
		}
	}()
	dc := spikedetect.DefaultConfig()
	dc.AutoGroup = 4
	dc.HighpassHz = r.HighpassHz
	d, err := spikedetect.New(dc, spikedetect.Stream{Channels: r.Channels, SampleRate: rate, BlockSamples: r.Samples, Processor: 100})
	if err != nil {
		return err
	}
	var sample int64
	spikes := 0
	step := func() error {
		b := blocks[(sample/int64(r.Samples))%int64(n)]
		b.Reset()
		b.FirstSample = sample
		sample += int64(r.Samples)
		if err := d.Process(b); err != nil {
			return err
		}
		spikes += len(b.Spikes)
		return nil
	}
	for range 5 * rate / r.Samples { // 5 s: noise estimates, every block's buffers
		if err := step(); err != nil {
			return err
		}
	}
	spikes = 0
	r.Blocks = int(seconds * rate / float64(r.Samples))
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	cpu0, t0 := benchThreadCPU(), time.Now()
	for range r.Blocks {
		if err := step(); err != nil {
			return err
		}
	}
	cpu, wall := benchThreadCPU()-cpu0, time.Since(t0)
	runtime.ReadMemStats(&m1)
	r.CPUPerBlock = cpu / time.Duration(r.Blocks)
	r.WallPerBlock = wall / time.Duration(r.Blocks)
	r.AllocsPerBlock = float64(m1.Mallocs-m0.Mallocs) / float64(r.Blocks)
	r.SpikesPerSecond = float64(spikes) / seconds
	return nil
}

// benchThreadCPU is the CPU time the calling OS thread has used.
func benchThreadCPU() time.Duration {
	var ru syscall.Rusage
	const rusageThread = 1 // RUSAGE_THREAD
	if err := syscall.Getrusage(rusageThread, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func spikesTable(rs []SpikesResult, seconds float64) benchTable {
	t := benchTable{
		Title: fmt.Sprintf("Spike detector ([spikes] auto_group = 4, 5×MAD) on %g s of simulated signal with planted spikes per case", seconds),
		Header: []string{"channels × samples", "high-pass", "blocks", "CPU per block", "wall per block", "share of one core",
			"spikes/s", "allocs per block"},
	}
	for _, r := range rs {
		hp := "off"
		if r.HighpassHz > 0 {
			hp = fmt.Sprintf("%g Hz", r.HighpassHz)
		}
		t.add(fmt.Sprintf("%d × %d", r.Channels, r.Samples), hp, strconv.Itoa(r.Blocks), fmtDur(r.CPUPerBlock),
			fmtDur(r.WallPerBlock), fmt.Sprintf("%.1f%%", 100*r.RealTimeShare()),
			fmt.Sprintf("%.0f", r.SpikesPerSecond), fmt.Sprintf("%.4f", r.AllocsPerBlock))
	}
	t.Note = "CPU per block: the detecting thread's own CPU time (getrusage RUSAGE_THREAD), which a busy machine does not " +
		"inflate as it does wall time; share of one core: that over the block's 1/30000 s per sample. The detector runs " +
		"before the Python stages on the same thread (pipeline/spikedetect; `go test -bench SpikeDetect ./pipeline/spikedetect` " +
		"gives the same figures as Go benchmarks)."
	return t
}
