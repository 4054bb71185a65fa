// Package pyrttest holds the known signal that the tests of pyrt and of
// its isolated workers feed their stages, so that both compare output
// against the same input.
package pyrttest

import "github.com/ephysd/ephysd/pipeline"

// InputValue is sample number sample of channel c: c*1000 + sample (mod 997).
func InputValue(c int, sample int64) float32 { return float32(c*1000) + float32(sample%997) }

// Fill writes into b the samples from next on: InputValue on every
// channel, and digital line 0 high for samples [5, 25) of each 40.
func Fill(b *pipeline.Block, next int64) {
	b.FirstSample = next
	for c := 0; c < b.Channels; c++ {
		ch := b.Channel(c)
		for i := range ch {
			ch[i] = InputValue(c, next+int64(i))
		}
	}
	for i := 0; i < b.Samples; i++ {
		sn := (next + int64(i)) % 40
		if sn >= 5 && sn < 25 {
			b.Digital[i] = 1
		} else {
			b.Digital[i] = 0
		}
	}
}
