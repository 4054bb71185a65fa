package sim

import "math"

// PlantSideGain is the amplitude of a planted spike on the planted channels
// other than its main one, relative to the main one.
const PlantSideGain = 0.35

// plantKnots shape the planted waveform: (time in ms from the waveform's
// start, value at 1 µV trough depth), joined by straight lines. The trough
// knot falls on a whole sample (plantTroughMS is rounded to samples), so the
// waveform's minimum is that one sample, and up to 30 kHz its neighbours are
// at most 70% of it: the trough stays the minimum under moderate noise.
var plantKnots = [...]struct{ ms, v float64 }{
	{0, 0}, {0.3, -0.1}, {plantTroughMS, -1}, {0.5, 0}, {0.75, 0.3}, {plantLenMS, 0},
}

const (
	plantTroughMS = 0.4
	plantLenMS    = 1.6
)

// plantLen is the planted waveform's length in samples at rate Hz.
func plantLen(rate int) int { return int(math.Round(plantLenMS * float64(rate) / 1000)) }

// PlantTemplate returns the planted waveform at rate Hz for a trough depth
// of 1 µV (its minimum is −1), and the index of its trough.
func PlantTemplate(rate int) (template []float32, trough int) {
	n := plantLen(rate)
	knot := make([]float64, len(plantKnots)) // knot positions in samples
	for i, k := range plantKnots {
		knot[i] = math.Round(k.ms * float64(rate) / 1000)
	}
	template = make([]float32, n)
	j := 0
	for s := range template {
		x := float64(s)
		for j+2 < len(knot) && x >= knot[j+1] {
			j++
		}
		a, b := knot[j], knot[j+1]
		f := 0.0
		if b > a {
			f = (x - a) / (b - a)
		}
		template[s] = float32(plantKnots[j].v + f*(plantKnots[j+1].v-plantKnots[j].v))
	}
	return template, int(knot[2])
}

// PlantedSpike is a spike the simulator planted.
type PlantedSpike struct {
	// SampleNumber is the sample number of the trough (the waveform's
	// minimum on its main channel).
	SampleNumber int64
	// Channel is the 0-based main channel: the spike is plant_uv deep
	// there and PlantSideGain of that on the other planted channels.
	Channel int
}

// Planted returns the spikes planted with their troughs at sample numbers
// from..to−1, in order. The configuration must have passed Validate.
func (c *Config) Planted(from, to int64) []PlantedSpike {
	if len(c.PlantChannels) == 0 {
		return nil
	}
	_, trough := PlantTemplate(c.Rate)
	slot := c.plantSlot()
	var out []PlantedSpike
	for k := max(1, (from-int64(trough))/slot); k*slot <= to; k++ {
		start, main := c.plantedSpike(k, slot)
		if at := start + int64(trough); at >= from && at < to {
			out = append(out, PlantedSpike{SampleNumber: at, Channel: c.PlantChannels[main] - 1})
		}
	}
	return out
}

// plantSlot is the number of samples between the starts of two slots.
func (c *Config) plantSlot() int64 { return int64(math.Round(float64(c.Rate) / c.PlantRate)) }

// plantedSpike returns the first sample number of planted spike k and the
// index in PlantChannels of its main channel.
func (c *Config) plantedSpike(k, slot int64) (start int64, main int) {
	h := mix(uint64(c.Seed)*0x2545f4914f6cdd1d ^ uint64(k)*0x9e3779b97f4a7c15 ^ 0x706c616e74)
	room := uint64(slot) - uint64(plantLen(c.Rate)) + 1
	return k*slot + int64(h%room), int((h >> 32) % uint64(len(c.PlantChannels)))
}

// addPlanted adds the planted spikes that overlap samples first..first+n−1
// to data (channel-major, stride n).
func (s *Source) addPlanted(data []float32, first int64, n int) {
	if len(s.cfg.PlantChannels) == 0 || s.cfg.PlantUV == 0 {
		return
	}
	w := int64(len(s.plant))
	slot := s.cfg.plantSlot()
	end := first + int64(n)
	for k := max(1, (first-w)/slot); k*slot < end; k++ {
		start, main := s.cfg.plantedSpike(k, slot)
		from, to := max(start, first), min(start+w, end)
		if from >= to {
			continue
		}
		tpl := s.plant[from-start : to-start]
		for i, ch := range s.cfg.PlantChannels {
			g := float32(s.cfg.PlantUV)
			if i != main {
				g *= PlantSideGain
			}
			c := ch - 1
			d := data[c*n+int(from-first) : c*n+int(to-first)]
			d = d[:len(tpl)]
			for j, v := range tpl {
				d[j] += g * v
			}
		}
	}
}
