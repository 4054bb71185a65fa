package drivers

import (
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/pipeline"
)

// LineInput is a device with digital input lines (an FTDI chip in bitbang
// mode, an Arduino reporting pins) whose levels are merged into the
// headstage's blocks: it has no sample clock of its own.
type LineInput interface {
	// Lines returns the latest levels (bit n = line n) and when they were
	// read.
	Lines() (uint64, time.Time)
	// Err is non-nil once the device has failed (unplugged).
	Err() error
	Close() error
}

// InputConfig is one input driver's configuration ([input.<name>]).
type InputConfig interface {
	// OpenInput opens and starts the device; Width is how many lines it has.
	OpenInput() (LineInput, error)
	Width() int
}

var inputs = map[string]func() InputConfig{}

// RegisterInput makes an input driver known under name.
func RegisterInput(name string, newConfig func() InputConfig) {
	mu.Lock()
	defer mu.Unlock()
	if _, dup := inputs[name]; dup {
		panic("drivers: input " + name + " registered twice")
	}
	inputs[name] = newConfig
}

// InputNames lists the registered input drivers, sorted.
func InputNames() []string {
	mu.Lock()
	defer mu.Unlock()
	names := make([]string, 0, len(inputs))
	for n := range inputs {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// NewInputConfig returns the default configuration of the named input driver.
func NewInputConfig(name string) (InputConfig, error) {
	mu.Lock()
	f, ok := inputs[name]
	mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("unknown input driver %q (known: %v)", name, InputNames())
	}
	return f(), nil
}

// MergedInput is one input device placed in the source's digital word.
type MergedInput struct {
	Name      string
	Config    InputConfig
	FirstLine int // the device's line 0 becomes this line of the word
}

// MergedSource ORs the lines of input devices into every sample's digital
// word of a source's blocks, so the runner turns their changes into TTL
// events on the source's clock. The time resolution is a block (the levels
// are read once per block) plus the device's polling period. An input that
// fails is reopened with backoff; meanwhile its lines read 0 and the
// failure is logged.
type MergedSource struct {
	Source
	info   pipeline.StreamInfo
	inputs []*mergedInput
	log    *zap.Logger
}

type mergedInput struct {
	MergedInput
	cur     atomic.Pointer[lineBox]
	mask    uint64
	backoff Backoff
	closed  chan struct{}
	wg      sync.WaitGroup
	state   stateBox
	log     *zap.Logger
}

type lineBox struct{ in LineInput }

// NewMergedSource opens every input (an error here is returned as is) and
// wraps src.
func NewMergedSource(src Source, ins []MergedInput, log *zap.Logger) (*MergedSource, error) {
	if log == nil {
		log = zap.NewNop()
	}
	m := &MergedSource{Source: src, info: src.Info(), log: log}
	used := uint64(0)
	if m.info.TTLLines > 0 {
		used = (uint64(1)<<uint(m.info.TTLLines) - 1)
		if m.info.TTLLines >= 64 {
			used = ^uint64(0)
		}
	}
	for _, in := range ins {
		w := in.Config.Width()
		if in.FirstLine < 0 || in.FirstLine+w > 64 {
			m.Close()
			return nil, fmt.Errorf("input %s: first_line %d with %d lines does not fit lines 0–63", in.Name, in.FirstLine, w)
		}
		mask := (uint64(1)<<uint(w) - 1) << uint(in.FirstLine)
		if w >= 64 {
			mask = ^uint64(0)
		}
		if mask&used != 0 {
			m.Close()
			return nil, fmt.Errorf("input %s: lines %d–%d overlap lines already in use (the source has %d lines, and earlier inputs); set first_line to a free line",
				in.Name, in.FirstLine, in.FirstLine+w-1, m.info.TTLLines)
		}
		used |= mask
		dev, err := in.Config.OpenInput()
		if err != nil {
			m.Close()
			return nil, fmt.Errorf("input %s: %w", in.Name, err)
		}
		mi := &mergedInput{MergedInput: in, mask: mask, closed: make(chan struct{}), log: log}
		mi.cur.Store(&lineBox{dev})
		mi.state.set(true, nil)
		m.inputs = append(m.inputs, mi)
		if top := in.FirstLine + w; top > m.info.TTLLines {
			m.info.TTLLines = top
		}
	}
	return m, nil
}

// Info is the source's stream with the input lines added.
func (m *MergedSource) Info() pipeline.StreamInfo { return m.info }

// InputStates reports each input device's connection state.
func (m *MergedSource) InputStates() []DeviceState {
	out := make([]DeviceState, len(m.inputs))
	for i, in := range m.inputs {
		out[i] = in.stateNow()
	}
	return out
}

// stateNow is the input's state with the link counts of the device open
// now (read under the state lock, under which a failed device's counts
// move to the total).
func (in *mergedInput) stateNow() DeviceState {
	in.state.mu.Lock()
	defer in.state.mu.Unlock()
	s := in.state.s
	if box := in.cur.Load(); box != nil {
		s.Link = s.Link.Add(linkOf(box.in))
	}
	return s
}

// retire takes box's device out, if it is still the current one, calls
// gone (when not nil) and closes the device.
func (in *mergedInput) retire(box *lineBox, gone func()) bool {
	ok, _ := in.state.retire(box.in, func() bool { return in.cur.CompareAndSwap(box, nil) }, func() error {
		if gone != nil {
			gone()
		}
		return box.in.Close()
	})
	return ok
}

// ReadBlock reads the source's block and merges the input lines into it.
func (m *MergedSource) ReadBlock(b *pipeline.Block) error {
	if err := m.Source.ReadBlock(b); err != nil {
		return err
	}
	for _, in := range m.inputs {
		word := in.read() << uint(in.FirstLine) & in.mask
		if word == 0 {
			continue
		}
		for i := range b.Digital[:b.Samples] {
			b.Digital[i] |= word
		}
	}
	return nil
}

func (in *mergedInput) read() uint64 {
	box := in.cur.Load()
	if box == nil {
		return 0
	}
	if err := box.in.Err(); err != nil {
		if in.retire(box, func() {
			in.log.Error("input device failed; its lines read 0 until it is back (reopening with backoff)",
				zap.String("device", in.Name), zap.Error(err))
			in.state.set(false, err)
		}) {
			in.wg.Add(1)
			go in.reopen()
		}
		return 0
	}
	w, _ := box.in.Lines()
	return w
}

func (in *mergedInput) reopen() {
	defer in.wg.Done()
	var wait time.Duration
	for attempt := 1; ; attempt++ {
		wait = in.backoff.next(wait)
		select {
		case <-in.closed:
			return
		case <-time.After(wait):
		}
		dev, err := in.Config.OpenInput()
		if err != nil {
			in.state.set(false, err)
			if attempt == 1 || attempt%10 == 0 {
				in.log.Warn("input device still missing", zap.String("device", in.Name), zap.Int("attempt", attempt), zap.Error(err))
			}
			continue
		}
		select {
		case <-in.closed:
			dev.Close()
			return
		default:
		}
		in.cur.Store(&lineBox{dev})
		in.state.set(true, nil)
		in.log.Info("input device reconnected", zap.String("device", in.Name))
		return
	}
}

// Close closes the inputs and the source.
func (m *MergedSource) Close() error {
	for _, in := range m.inputs {
		close(in.closed)
		in.wg.Wait()
		if box := in.cur.Load(); box != nil {
			in.retire(box, nil)
		}
	}
	return m.Source.Close()
}
