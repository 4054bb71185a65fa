package spikedetect_test

import (
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers/sim"
	"github.com/ephysd/ephysd/pipeline"
	"github.com/ephysd/ephysd/pipeline/spikedetect"
)

// BenchmarkSpikeDetect384 runs the detector on 384 channels at 30 kHz in
// 30-sample (1 ms) blocks: 96 tetrodes at 5×MAD on the simulator's signal
// (5 µV noise, 40 µV LFP, 40 units, spikes planted on 16 channels), without
// and with the high-pass. ns/op is the time per block; realtime_% is that
// time as a share of the 1 ms the block lasts. cpu-ns/block is the CPU
// time of the benchmark's thread per block, which, unlike ns/op, a busy
// machine does not inflate.
func BenchmarkSpikeDetect384(b *testing.B) {
	benchDetect(b, 384, 30)
}

// BenchmarkSpikeDetectClosedLoop is the closed-loop preset's case: 32
// channels (8 tetrodes) in blocks of one sample.
func BenchmarkSpikeDetectClosedLoop(b *testing.B) {
	benchDetect(b, 32, 1)
}

func benchDetect(b *testing.B, channels, blockLen int) {
	// 0.4 s of signal, replayed with growing sample numbers.
	blocks := 12000 / blockLen
	cfg := sim.DefaultConfig()
	cfg.Channels = channels
	cfg.Realtime = false
	cfg.Units = channels / 10
	cfg.PlantChannels = []int{1, 2, 3, 4, 17, 18, 19, 20}
	cfg.PlantRate = 100
	src, err := sim.New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	src.Start()
	defer src.Close()
	full, _ := pipeline.NewPool(blocks, channels, blockLen)
	defer full.Close(false)
	data := make([]*pipeline.Block, blocks)
	for i := range data {
		data[i] = full.TryGet()
		if err := src.ReadBlock(data[i]); err != nil {
			b.Fatal(err)
		}
	}
	defer func() {
		for _, blk := range data {
			blk.Release()
		}
	}()
	for _, hp := range []float64{0, 300} {
		name := "raw"
		if hp > 0 {
			name = "highpass"
		}
		b.Run(name, func(b *testing.B) {
			dc := spikedetect.DefaultConfig()
			dc.AutoGroup = 4
			dc.HighpassHz = hp
			d, err := spikedetect.New(dc, spikedetect.Stream{Channels: channels, SampleRate: 30000, BlockSamples: blockLen, Processor: 100})
			if err != nil {
				b.Fatal(err)
			}
			var sample int64
			spikes := 0
			step := func() {
				blk := data[(sample/int64(blockLen))%int64(blocks)]
				blk.Reset() // as the pool does
				blk.FirstSample = sample
				sample += int64(blockLen)
				if err := d.Process(blk); err != nil {
					b.Fatal(err)
				}
				spikes += len(blk.Spikes)
			}
			for range 5 * 30000 / blockLen { // 5 s: noise estimates and every block's buffers
				step()
			}
			spikes = 0
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			b.ReportAllocs()
			b.ResetTimer()
			cpu0 := threadCPU()
			for i := 0; i < b.N; i++ {
				step()
			}
			cpu := threadCPU() - cpu0
			blockSecs := float64(blockLen) / 30000
			b.ReportMetric(100*b.Elapsed().Seconds()/float64(b.N)/blockSecs, "realtime_%")
			b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/block")
			b.ReportMetric(float64(spikes)/(float64(b.N)*blockSecs), "spikes/s")
		})
	}
}

// threadCPU is the CPU time the calling OS thread has used.
func threadCPU() time.Duration {
	var ru syscall.Rusage
	const rusageThread = 1 // RUSAGE_THREAD
	if err := syscall.Getrusage(rusageThread, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
