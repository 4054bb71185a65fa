package stream_test

import (
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers/stream/streamdev"
)

// benchSustained reads blocks of 300 samples (10 ms) from a 64-channel,
// 30 kHz int16 device and reports the rate relative to real time and the
// gaps. realtime paces the device to the wall clock for 2 s.
func benchSustained(b *testing.B, transport string, realtime bool) {
	d := patternDevice(b, streamdev.Config{Realtime: realtime})
	cfg := onPTY
	if transport == "usb" {
		cfg = onUSB
	}
	s := open(b, cfg(b, d))
	blk := newBlock(b, 64, 300)
	if err := s.Start(); err != nil {
		b.Fatal(err)
	}
	blocks := b.N
	if realtime {
		blocks = 200 * b.N // 2 s per iteration
	}
	b.ReportAllocs()
	b.SetBytes(int64(blocks/b.N) * 300 * (64*2 + 2))
	start := time.Now()
	b.ResetTimer()
	samples := 0
	for i := 0; i < blocks; i++ {
		blk.Reset()
		if err := s.ReadBlock(blk); err != nil {
			b.Fatal(err)
		}
		samples += blk.Samples
	}
	el := time.Since(start)
	b.StopTimer()
	st := s.Stats()
	b.ReportMetric(float64(samples)/30000/el.Seconds(), "x_realtime")
	b.ReportMetric(float64(st.Gaps), "gaps")
	b.ReportMetric(float64(samples)/el.Seconds(), "samples/s")
}

func BenchmarkSustainedPTY(b *testing.B) { benchSustained(b, "pty", false) }
func BenchmarkSustainedUSB(b *testing.B) { benchSustained(b, "usb", false) }
func BenchmarkRealtimePTY(b *testing.B)  { benchSustained(b, "pty", true) }
func BenchmarkRealtimeUSB(b *testing.B)  { benchSustained(b, "usb", true) }
