package spikedetect

import "math"

// highpass is a 2nd-order Butterworth high-pass filter (bilinear
// transform, transposed direct form II, float64 state), one state per
// channel.
type highpass struct {
	b0, b1, b2, a1, a2 float64
	z1, z2             []float64
	primed             []bool
}

func newHighpass(channels int, hz, rate float64) highpass {
	k := math.Tan(math.Pi * hz / rate)
	q := 1 / math.Sqrt2
	norm := 1 / (1 + k/q + k*k)
	return highpass{
		b0: norm, b1: -2 * norm, b2: norm,
		a1: 2 * (k*k - 1) * norm, a2: (1 - k/q + k*k) * norm,
		z1: make([]float64, channels), z2: make([]float64, channels), primed: make([]bool, channels),
	}
}

// restart makes every channel start again from its next sample, as if the
// signal had been constant at that value before (no step transient).
func (h *highpass) restart() { clear(h.primed) }

// filter writes the high-pass of x (channel ch, continuing its state) to y.
func (h *highpass) filter(ch int, y, x []float32) {
	y = y[:len(x)]
	z1, z2 := h.z1[ch], h.z2[ch]
	if !h.primed[ch] && len(x) > 0 {
		// Steady state for a constant input x0 (the output is 0).
		x0 := float64(x[0])
		z1, z2 = -h.b0*x0, h.b2*x0
		h.primed[ch] = true
	}
	b0, b1, b2, a1, a2 := h.b0, h.b1, h.b2, h.a1, h.a2
	for i, v := range x {
		in := float64(v)
		out := b0*in + z1
		z1 = b1*in - a1*out + z2
		z2 = b2*in - a2*out
		y[i] = float32(out)
	}
	h.z1[ch], h.z2[ch] = z1, z2
}

// filter2 is filter for channels a and b at once: two independent chains
// keep the CPU's floating-point units busy where one waits on itself.
func (h *highpass) filter2(a, b int, ya, xa, yb, xb []float32) {
	if len(xa) != len(xb) || len(xa) == 0 {
		h.filter(a, ya, xa)
		h.filter(b, yb, xb)
		return
	}
	ya, yb, xb = ya[:len(xa)], yb[:len(xa)], xb[:len(xa)]
	for _, ch := range [2]int{a, b} {
		if !h.primed[ch] {
			x0 := float64(xa[0])
			if ch == b {
				x0 = float64(xb[0])
			}
			h.z1[ch], h.z2[ch] = -h.b0*x0, h.b2*x0
			h.primed[ch] = true
		}
	}
	za1, za2, zb1, zb2 := h.z1[a], h.z2[a], h.z1[b], h.z2[b]
	b0, b1, b2, a1, a2 := h.b0, h.b1, h.b2, h.a1, h.a2
	for i := range xa {
		ia, ib := float64(xa[i]), float64(xb[i])
		oa := b0*ia + za1
		ob := b0*ib + zb1
		za1 = b1*ia - a1*oa + za2
		zb1 = b1*ib - a1*ob + zb2
		za2 = b2*ia - a2*oa
		zb2 = b2*ib - a2*ob
		ya[i] = float32(oa)
		yb[i] = float32(ob)
	}
	h.z1[a], h.z2[a], h.z1[b], h.z2[b] = za1, za2, zb1, zb2
}
