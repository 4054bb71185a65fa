package isolated

import (
	"encoding/binary"
	"fmt"
	"math"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ephysd/ephysd/pipeline"
)

// The shared memory of one worker: a memfd the parent creates and sizes,
// mapped by both processes. Its layout:
//
//	0        header (one page): sequence numbers, request, response, sizes
//	4 KiB    argument (the recording folder of start_recording)
//	8 KiB    events in  (TTL events of the block, for handle_ttl_event)
//	         events out (add_python_event)
//	         spikes in  (for handle_spike)
//	         spikes out (spikes a script adds)
//	dataOff  the block's samples: channels × samples float32, channel-major
//
// Only the data area grows (a block of more channels or samples than it
// holds remaps it); the other areas have fixed sizes, and what does not fit
// is counted, not written.
const (
	pageSize   = 4096
	headerSize = pageSize
	argOff     = headerSize
	argSize    = pageSize
	eventsSize = 128 << 10 // each direction: 5461 events of 24 bytes
	spikesSize = 1 << 20   // each direction: 1024 spikes of 4 channels × 60 samples
	evInOff    = argOff + argSize
	evOutOff   = evInOff + eventsSize
	spInOff    = evOutOff + eventsSize
	spOutOff   = spInOff + spikesSize
	dataOff    = spOutOff + spikesSize

	eventRecord = 24 // bytes per encoded event
	spikeHeader = 40 // bytes before a spike's electrode name and waveform

	shmMagic   = 0x65706879 // "ephy"
	shmVersion = 1
)

// Request kinds (header.kind).
const (
	kindBlock = 1 // process the block in the data area
	kindHook  = 2 // run hook header.hook (start_recording gets the argument)
	kindRemap = 3 // the memfd grew to header.mapSize: map it again
)

// Hooks (header.hook), in the order of pyrt's EPHYS_HOOK_*.
const (
	hookStartAcquisition = 0
	hookStopAcquisition  = 1
	hookStartRecording   = 2
	hookStopRecording    = 3
)

var hookNames = [4]string{"start_acquisition", "stop_acquisition", "start_recording", "stop_recording"}

// Response status (header.status).
const (
	statusProcessed   = 1 // the data area holds the stage's output: copy it back
	statusPassThrough = 2 // the stage did not touch the data (not loaded, disabled)
	statusDone        = 3 // a hook or remap finished
	statusBadRequest  = 4 // the request did not fit the mapping (a bug): data untouched
)

// header is the first page of the mapping. Both sides are the same binary,
// so they agree on its layout. The parent writes the request fields, then
// reqSeq; the worker reads reqSeq, then the fields, writes the response
// fields, then respSeq (the eventfd writes between them order the rest).
type header struct {
	magic, version uint32
	reqSeq         atomic.Uint64
	respSeq        atomic.Uint64

	// Request.
	kind, hook        uint32
	channels, samples uint32
	first             int64
	evInN, evInBytes  uint32
	spInN, spInBytes  uint32
	argLen            uint32
	_                 uint32
	mapSize           uint64 // bytes of the whole mapping (remap)

	// Response.
	status             uint32
	evOutN, evOutBytes uint32
	spOutN, spOutBytes uint32
	evOutDropped       uint32
	spOutDropped       uint32
	retained           uint32 // the script keeps a view of the data area
	pyErrors           atomic.Uint64
}

// shmSize is the mapping size for a data area of floats float32 values.
func shmSize(floats int) int {
	n := dataOff + 4*floats
	return (n + pageSize - 1) / pageSize * pageSize
}

// dataFloats is the capacity of the data area of a mapping of size bytes.
func dataFloats(size int) int { return (size - dataOff) / 4 }

// mapping is one mapping of the memfd.
type mapping struct {
	mem  []byte
	hdr  *header
	data []float32 // the whole data area
}

func mapShm(fd int, size int) (*mapping, error) {
	if size < dataOff+4 {
		return nil, fmt.Errorf("shared memory of %d bytes is too small", size)
	}
	mem, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mapping %d bytes of shared memory: %w", size, err)
	}
	m := &mapping{mem: mem, hdr: (*header)(unsafe.Pointer(&mem[0]))}
	m.data = unsafe.Slice((*float32)(unsafe.Pointer(&mem[dataOff])), dataFloats(size))
	return m, nil
}

func (m *mapping) unmap() error {
	if m == nil || m.mem == nil {
		return nil
	}
	err := unix.Munmap(m.mem)
	m.mem, m.hdr, m.data = nil, nil, nil
	return err
}

func (m *mapping) area(off, size int) []byte { return m.mem[off : off+size] }

// newMemfd makes the worker's shared memory, sized for floats samples.
func newMemfd(name string, floats int) (*os.File, int, error) {
	fd, err := unix.MemfdCreate("ephysd-stage-"+name, unix.MFD_CLOEXEC)
	if err != nil {
		return nil, 0, fmt.Errorf("memfd_create: %w", err)
	}
	f := os.NewFile(uintptr(fd), "ephysd-stage-shm")
	size := shmSize(floats)
	if err := f.Truncate(int64(size)); err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("sizing the shared memory to %d bytes: %w", size, err)
	}
	return f, size, nil
}

var le = binary.LittleEndian

// putEvent encodes a TTL event at buf[0:eventRecord].
func putEvent(buf []byte, e *pipeline.Event) {
	buf[0] = byte(e.Kind)
	buf[1] = e.Line
	buf[2] = 0
	if e.State {
		buf[2] = 1
	}
	buf[3] = 0
	le.PutUint32(buf[4:], uint32(int32(e.Processor)))
	le.PutUint64(buf[8:], uint64(e.SampleNumber))
	le.PutUint64(buf[16:], e.FullWord)
}

func getEvent(buf []byte) pipeline.Event {
	return pipeline.Event{
		Kind:         pipeline.EventKind(buf[0]),
		Line:         buf[1],
		State:        buf[2] != 0,
		Processor:    int(int32(le.Uint32(buf[4:]))),
		SampleNumber: int64(le.Uint64(buf[8:])),
		FullWord:     le.Uint64(buf[16:]),
	}
}

// eventWriter appends events to an area; what does not fit is counted.
type eventWriter struct {
	buf     []byte
	n, used int
	dropped int
}

func (w *eventWriter) reset(buf []byte) { *w = eventWriter{buf: buf} }

func (w *eventWriter) add(e *pipeline.Event) {
	if w.used+eventRecord > len(w.buf) {
		w.dropped++
		return
	}
	putEvent(w.buf[w.used:], e)
	w.used += eventRecord
	w.n++
}

// readEvents appends the n events encoded in buf to dst.
func readEvents(dst []pipeline.Event, buf []byte, n int) ([]pipeline.Event, error) {
	if n < 0 || n*eventRecord > len(buf) {
		return dst, fmt.Errorf("%d events do not fit an area of %d bytes", n, len(buf))
	}
	for i := 0; i < n; i++ {
		dst = append(dst, getEvent(buf[i*eventRecord:]))
	}
	return dst, nil
}

func spikeSize(sp *pipeline.Spike) int {
	n := spikeHeader + len(sp.Electrode)
	n = (n + 3) &^ 3
	n += 4 * sp.Channels * sp.Samples
	return (n + 7) &^ 7
}

// spikeWriter appends spikes to an area; what does not fit is counted.
type spikeWriter struct {
	buf     []byte
	n, used int
	dropped int
}

func (w *spikeWriter) reset(buf []byte) { *w = spikeWriter{buf: buf} }

func (w *spikeWriter) add(sp *pipeline.Spike) {
	values := sp.Channels * sp.Samples
	if sp.Channels < 0 || sp.Samples < 0 || len(sp.Waveform) < values || len(sp.Electrode) > math.MaxUint16 {
		w.dropped++
		return
	}
	size := spikeSize(sp)
	if w.used+size > len(w.buf) {
		w.dropped++
		return
	}
	b := w.buf[w.used : w.used+size]
	le.PutUint32(b[0:], uint32(int32(sp.Processor)))
	le.PutUint32(b[4:], uint32(int32(sp.SortedID)))
	le.PutUint32(b[8:], uint32(sp.Channels))
	le.PutUint32(b[12:], uint32(sp.Samples))
	le.PutUint64(b[16:], uint64(sp.SampleNumber))
	le.PutUint32(b[24:], uint32(len(sp.Electrode)))
	le.PutUint32(b[28:], uint32(size))
	le.PutUint32(b[32:], uint32(int32(sp.ElectrodeIndex)))
	le.PutUint32(b[36:], 0)
	copy(b[spikeHeader:], sp.Electrode)
	off := (spikeHeader + len(sp.Electrode) + 3) &^ 3
	for i, v := range sp.Waveform[:values] {
		le.PutUint32(b[off+4*i:], math.Float32bits(v))
	}
	w.used += size
	w.n++
}

// spikeReader decodes spikes. Electrode names are interned, and waveforms
// go into the buffers that the spare capacity of the destination holds from
// an earlier use of the block (pipeline.Spike's contract), so decoding the
// same electrodes block after block does not allocate.
type spikeReader struct {
	names map[string]string
}

// maxNames bounds the interned electrode names (past it, a name is
// allocated per spike).
const maxNames = 4096

// read appends the n spikes encoded in buf to dst.
func (r *spikeReader) read(dst []pipeline.Spike, buf []byte, n int) ([]pipeline.Spike, error) {
	off := 0
	for i := 0; i < n; i++ {
		if off+spikeHeader > len(buf) {
			return dst, fmt.Errorf("spike %d of %d lies beyond the spike area", i+1, n)
		}
		b := buf[off:]
		channels, samples := int(le.Uint32(b[8:])), int(le.Uint32(b[12:]))
		nameLen := int(le.Uint32(b[24:]))
		size := int(le.Uint32(b[28:]))
		wstart := (spikeHeader + nameLen + 3) &^ 3
		values := channels * samples
		if size < spikeHeader || size > len(b) || channels < 0 || samples < 0 || channels > 1<<20 || samples > 1<<20 ||
			spikeHeader+nameLen > size || wstart+4*values > size {
			return dst, fmt.Errorf("spike %d of %d is malformed", i+1, n)
		}
		name := b[spikeHeader : spikeHeader+nameLen]
		electrode, ok := r.names[string(name)]
		if !ok {
			electrode = string(name)
			if r.names == nil {
				r.names = map[string]string{}
			}
			if len(r.names) < maxNames {
				r.names[electrode] = electrode
			}
		}
		k := len(dst)
		if k < cap(dst) {
			dst = dst[:k+1]
		} else {
			dst = append(dst, pipeline.Spike{})
		}
		sp := &dst[k]
		wave := sp.Waveform[:0]
		if cap(wave) < values {
			wave = make([]float32, values)
		}
		wave = wave[:values]
		for j := range wave {
			wave[j] = math.Float32frombits(le.Uint32(b[wstart+4*j:]))
		}
		*sp = pipeline.Spike{
			Processor:      int(int32(le.Uint32(b[0:]))),
			SortedID:       int(int32(le.Uint32(b[4:]))),
			Channels:       channels,
			Samples:        samples,
			SampleNumber:   int64(le.Uint64(b[16:])),
			ElectrodeIndex: int(int32(le.Uint32(b[32:]))),
			Electrode:      electrode,
			Waveform:       wave,
		}
		off += size
	}
	return dst, nil
}
