package stream

import (
	"math/rand/v2"
	"testing"
)

// BenchmarkDecoder decodes 64-channel int16 frames of 30 samples (1 ms at
// 30 kHz) fed in 16 KiB reads, converting every sample to µV.
func BenchmarkDecoder(b *testing.B) {
	a := Announce{Version: 1, Format: Int16, DigitalBytes: 2, Channels: 64, MaxSamples: 30, RateMilliHz: 30000000, ScaleUV: 0.195}
	e, _ := NewEncoder(a)
	r := rand.New(rand.NewPCG(1, 1))
	var wire []byte
	const frames = 256
	for k := 0; k < frames; k++ {
		_, _, samples, digital := randomFrame(r, a)
		samples, digital = samples[:0], digital[:0]
		for i := 0; i < 30*64; i++ {
			samples = append(samples, int32(int16(r.Uint32())))
		}
		for i := 0; i < 30; i++ {
			digital = append(digital, uint64(uint16(r.Uint32())))
		}
		wire, _ = e.AppendData(wire, uint64(30*k), samples, digital)
	}
	lay := a.Layout()
	d := NewDecoder(0)
	d.SetMaxPayload(lay.MaxPayload())
	scale := make([]float32, 64)
	for c := range scale {
		scale[c] = 0.195
	}
	dst := make([]float32, 64*30)
	dig := make([]uint64, 30)
	b.SetBytes(int64(len(wire)))
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		for p := wire; len(p) > 0; {
			p = p[d.Feed(p[:min(len(p), 16384)]):]
			for {
				f, ok := d.Next()
				if !ok {
					break
				}
				dd, err := lay.Data(f.Payload)
				if err != nil {
					b.Fatal(err)
				}
				dd.Scale(0, dd.Samples, dst, 30, 0, scale, dig)
			}
		}
	}
	if d.Stats().BadFrames != 0 || d.Stats().Discarded != 0 {
		b.Fatal(d.Stats())
	}
	b.ReportMetric(float64(b.N)*frames*30/b.Elapsed().Seconds(), "samples/s")
}
