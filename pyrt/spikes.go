package pyrt

/*
#include "ephys_py.h"
*/
import "C"

import (
	"math"
	"time"
	"unsafe"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/pipeline"
)

// maxInternedNames bounds the electrode names a stage keeps as Go strings,
// so that a script inventing a new name per spike cannot grow memory
// without bound (past it, names are allocated per spike).
const maxInternedNames = 4096

// stageSpikes is what a Stage keeps for add_python_spike.
type stageSpikes struct {
	// cur is the block the stage is processing, while Process runs: the
	// spikes waveform=None may take its waveform from.
	cur *pipeline.Block
	// own is len(cur.Spikes) before this stage added any: the spikes that
	// came with the block.
	own        int
	names      map[string]string
	droppedLog pipeline.LogLimiter
}

// spikeLookback is how many samples before a block a spike added by
// add_python_spike may lie: one second. A spike reaches a stage in the
// block that completes its waveform, so its peak is often in an earlier
// block.
func spikeLookback(rate float64) int64 {
	if !(rate > 0) || math.IsInf(rate, 0) {
		return 0
	}
	return int64(math.Ceil(rate))
}

// beginSpikes tells the C side which block the stage is about to call
// handlers and process for, so add_python_spike checks sample numbers
// against it and waveform=None finds the block's spikes.
func (s *Stage) beginSpikes(b *pipeline.Block) {
	s.spikes.cur = b
	s.spikes.own = len(b.Spikes)
	C.ephys_stage_set_block(s.c, C.int64_t(b.FirstSample), C.int(b.Samples), C.int64_t(spikeLookback(s.cfg.SampleRate)))
}

// endSpikes forgets the block: calls outside Process (hooks) have none.
func (s *Stage) endSpikes(b *pipeline.Block) {
	s.spikes.cur = nil
	C.ephys_stage_set_block(s.c, C.int64_t(b.FirstSample), 0, C.int64_t(spikeLookback(s.cfg.SampleRate)))
}

// goPyrtFindSpike is add_python_spike's waveform=None: the index in the
// current block's Spikes of the first spike of electrode name at sample
// that came with the block (not one this stage added) and has a waveform,
// with its shape; -1 if there is none. It runs on the interpreter thread
// inside a call of Process, with the GIL held, and must not call Python.
//
//export goPyrtFindSpike
func goPyrtFindSpike(stageID C.int, name *C.char, n C.int, sample C.int64_t, channels, samples *C.int) C.int {
	v, ok := stageNames.Load(int(stageID))
	if !ok {
		return -1
	}
	s := v.(*Stage)
	b := s.spikes.cur
	if b == nil {
		return -1
	}
	want := unsafe.String((*byte)(unsafe.Pointer(name)), int(n))
	for i := range b.Spikes[:s.spikes.own] {
		sp := &b.Spikes[i]
		if sp.Processor != s.cfg.ID && sp.SampleNumber == int64(sample) && sp.Electrode == want &&
			sp.Channels > 0 && sp.Samples > 0 && len(sp.Waveform) == sp.Channels*sp.Samples {
			*channels, *samples = C.int(sp.Channels), C.int(sp.Samples)
			return C.int(i)
		}
	}
	return -1
}

// emitSpikes moves the spikes queued by add_python_spike into the block,
// stamped with this stage's id. Each waveform is copied into the Waveform
// buffer the spike's slot of b.Spikes holds from an earlier use of the
// block, as pipeline.Spike's contract allows, so that in steady state
// nothing is allocated.
func (s *Stage) emitSpikes(b *pipeline.Block) {
	n := int(C.ephys_stage_nspikes(s.c))
	dropped := int64(C.ephys_stage_spikes_dropped(s.c))
	if n > 0 {
		recs := unsafe.Slice(C.ephys_stage_spikes(s.c), n)
		names := C.ephys_stage_spike_names(s.c)
		waves := C.ephys_stage_spike_waves(s.c)
		for i := range recs {
			r := &recs[i]
			ch, ns := int(r.channels), int(r.samples)
			var src []float32
			electrodeIndex := 0
			if r.from_block >= 0 {
				if int(r.from_block) >= len(b.Spikes) {
					continue // cannot happen: the index was found in this block
				}
				from := &b.Spikes[r.from_block]
				src, electrodeIndex = from.Waveform, from.ElectrodeIndex
			} else {
				src = unsafe.Slice((*float32)(unsafe.Add(unsafe.Pointer(waves), uintptr(r.wave_off)*4)), ch*ns)
			}
			nameBytes := unsafe.Slice((*byte)(unsafe.Add(unsafe.Pointer(names), uintptr(r.name_off))), int(r.name_len))
			k := len(b.Spikes)
			if k < cap(b.Spikes) {
				b.Spikes = b.Spikes[:k+1]
			} else {
				b.Spikes = append(b.Spikes, pipeline.Spike{})
			}
			sp := &b.Spikes[k]
			buf := sp.Waveform[:0]
			if cap(buf) < len(src) {
				buf = make([]float32, len(src))
			}
			buf = buf[:len(src)]
			copy(buf, src)
			*sp = pipeline.Spike{
				Processor:      s.cfg.ID,
				Electrode:      s.internName(nameBytes),
				ElectrodeIndex: electrodeIndex,
				SampleNumber:   int64(r.sample),
				SortedID:       int(r.sorted_id),
				Channels:       ch,
				Samples:        ns,
				Waveform:       buf,
			}
		}
	}
	if dropped > 0 {
		if ok, more := s.spikes.droppedLog.Allow(time.Now()); ok {
			s.log.Warn("add_python_spike: too many spikes in one block, the rest were dropped",
				zap.Int("kept", n), zap.Int64("dropped", dropped), zap.Int("limit", C.EPHYS_MAX_SPIKES),
				zap.Int("more_not_logged", more))
		}
	}
	C.ephys_stage_spikes_reset(s.c)
}

// internName returns the electrode name as a Go string, allocating only the
// first time the stage sees it.
func (s *Stage) internName(b []byte) string {
	if name, ok := s.spikes.names[string(b)]; ok {
		return name
	}
	name := string(b)
	if s.spikes.names == nil {
		s.spikes.names = map[string]string{}
	}
	if len(s.spikes.names) < maxInternedNames {
		s.spikes.names[name] = name
	}
	return name
}
