package drivers

import (
	"fmt"
	"sort"

	"github.com/ephysd/ephysd/pipeline"
)

// An output maps event lines to a device's pins or channels. Each output
// driver's configuration ([output.<driver>]) holds a list of these as
// [[output.<driver>.map]] tables.

// Mapping routes one event line to one device pin or channel.
type Mapping struct {
	// From is where the events come from: "python" (default) for the lines
	// set by any Python stage's add_python_event, "input" to mirror a
	// source TTL input line, or a stage's name for one stage only.
	From string `toml:"from"`
	// Line is the event line (0–255 for Python events, 0–63 for inputs).
	Line int `toml:"line"`
	// Channel is the device's pin or channel (meaning depends on the driver:
	// FTDI bit 0–7, Pulse Pal channel 1–4, Arduino pin number).
	Channel int `toml:"channel"`
	// Mode "level" (default) makes the output follow the line; "trigger"
	// fires on each rising edge (devices with their own pulse, like Pulse
	// Pal) or makes a pulse of PulseMS on level-only devices.
	Mode string `toml:"mode"`
	// Invert drives the output low when the line is high.
	Invert bool `toml:"invert"`
	// PulseMS is the pulse length for Mode "trigger" on devices that only
	// set levels (FTDI, Arduino); 0 means the driver's default.
	PulseMS float64 `toml:"pulse_ms"`
}

// Check validates a mapping list for a driver whose channels run from
// minCh to maxCh.
func CheckMappings(driver string, m []Mapping, minCh, maxCh int) error {
	if len(m) == 0 {
		return fmt.Errorf("output %s: no [[output.%s.map]] entries: nothing would drive it", driver, driver)
	}
	for i := range m {
		e := &m[i]
		if e.From == "" {
			e.From = "python"
		}
		if e.Mode == "" {
			e.Mode = "level"
		}
		if e.Mode != "level" && e.Mode != "trigger" {
			return fmt.Errorf("output %s map %d: mode %q: use \"level\" or \"trigger\"", driver, i+1, e.Mode)
		}
		max := 255
		if e.From == "input" {
			max = 63
		}
		if e.Line < 0 || e.Line > max {
			return fmt.Errorf("output %s map %d: line %d: must be 0–%d", driver, i+1, e.Line, max)
		}
		if e.Channel < minCh || e.Channel > maxCh {
			return fmt.Errorf("output %s map %d: channel %d: this device has channels %d–%d", driver, i+1, e.Channel, minCh, maxCh)
		}
		if e.PulseMS < 0 {
			return fmt.Errorf("output %s map %d: pulse_ms %v: must be ≥ 0", driver, i+1, e.PulseMS)
		}
	}
	return nil
}

// Processors tells an output which processor ids its mappings' From names
// stand for.
type Processors struct {
	SourceID int            // "input"
	Python   map[string]int // stage name → processor id; "python" means all of them
}

// Route is one event matched to one mapping: Level is the level the output
// should take (Invert applied), Edge is true for a rising edge of the line
// (before Invert).
type Route struct {
	Mapping *Mapping
	Index   int // index of the mapping in the list
	Level   bool
	Rising  bool
	Event   *pipeline.Event
}

// Router matches a block's TTL events to mappings without allocating.
type Router struct {
	maps  []Mapping
	procs [][]int // per mapping: processor ids it accepts
}

// NewRouter prepares routing for mappings (already checked).
func NewRouter(maps []Mapping, p Processors) (*Router, error) {
	r := &Router{maps: maps, procs: make([][]int, len(maps))}
	for i, m := range maps {
		switch m.From {
		case "input":
			r.procs[i] = []int{p.SourceID}
		case "python":
			for _, id := range p.Python {
				r.procs[i] = append(r.procs[i], id)
			}
			sort.Ints(r.procs[i])
		default:
			id, ok := p.Python[m.From]
			if !ok {
				names := make([]string, 0, len(p.Python))
				for n := range p.Python {
					names = append(names, n)
				}
				sort.Strings(names)
				return nil, fmt.Errorf("output map %d: from %q: no such stage (use \"python\", \"input\" or one of %v)", i+1, m.From, names)
			}
			r.procs[i] = []int{id}
		}
	}
	return r, nil
}

// Each calls fn for every (event, mapping) pair in b's TTL events, in event
// order.
func (r *Router) Each(b *pipeline.Block, fn func(Route)) {
	for i := range b.Events {
		e := &b.Events[i]
		if e.Kind != pipeline.EventTTL {
			continue
		}
		for k := range r.maps {
			m := &r.maps[k]
			if int(e.Line) != m.Line || !contains(r.procs[k], e.Processor) {
				continue
			}
			fn(Route{Mapping: m, Index: k, Level: e.State != m.Invert, Rising: e.State, Event: e})
		}
	}
}

func contains(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// SinkConfig is one output driver's configuration block ([output.<name>]).
// Open makes the sink; p says which processor ids the mappings refer to.
type SinkConfig interface {
	Open(p Processors) (Sink, error)
}

var sinks = map[string]func() SinkConfig{}

// RegisterSink makes an output driver known under name.
func RegisterSink(name string, newConfig func() SinkConfig) {
	mu.Lock()
	defer mu.Unlock()
	if _, dup := sinks[name]; dup {
		panic("drivers: sink " + name + " registered twice")
	}
	sinks[name] = newConfig
}

// SinkNames lists the registered output drivers, sorted.
func SinkNames() []string {
	mu.Lock()
	defer mu.Unlock()
	names := make([]string, 0, len(sinks))
	for n := range sinks {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// NewSinkConfig returns the default configuration of the named output driver.
func NewSinkConfig(name string) (SinkConfig, error) {
	mu.Lock()
	f, ok := sinks[name]
	mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("unknown output driver %q (known: %v)", name, SinkNames())
	}
	return f(), nil
}
