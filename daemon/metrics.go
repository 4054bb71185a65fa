package daemon

import (
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/pipeline"
)

// Metrics exports the daemon's counters, gauges and timing histograms in
// the Prometheus text format, from a private registry that also holds the
// Go runtime and process collectors.
//
// Nothing is counted on the hot path for it: every value is read from the
// service when /metrics is scraped (the runner's atomic counters and
// histograms, the recorder's byte count, the devices' states, the Python
// stages' status), so a block costs the same with or without Prometheus.
//
// Restarts. Each acquisition is a new Chain whose runner, recorder and
// devices count from zero, but a Prometheus counter must never go down.
// Metrics therefore remembers the chain it saw at the previous scrape; when
// the service reports another chain (or none), that chain has been stopped
// completely (the service swaps chains under its lock only after Stop
// returned), so its counters and histograms are final: they are read once
// more and added to running totals kept here, and every later scrape
// exports those totals plus the current chain's values. The same is done
// for the Python exception counts, per stage object (stages outlive chains
// but are replaced when their module or the stream changes). Totals are
// kept per label value for as long as ephysd runs, so a device or stage
// that is no longer configured keeps its last count.
//
// The one loss: a chain that starts and ends entirely between two scrapes
// is never seen, so its counts are missing (never negative). With a scrape
// interval of 15 s that takes an acquisition shorter than 15 s.
type Metrics struct {
	svc *Service
	reg *prometheus.Registry

	mu     sync.Mutex
	chain  *Chain      // the chain seen at the last scrape
	done   chainTotals // sum over the chains that ended
	stages map[PythonStage]string
	// stageErrorsDone are the exceptions of stage objects that were
	// replaced, by stage name.
	stageErrorsDone map[string]uint64
}

// metricBounds are the upper bounds of the exported histogram buckets, from
// the 10 µs a small Python stage takes to the seconds a stuck disk takes.
var metricBounds = []time.Duration{
	10 * time.Microsecond, 25 * time.Microsecond, 50 * time.Microsecond,
	100 * time.Microsecond, 250 * time.Microsecond, 500 * time.Microsecond,
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond,
	10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond,
	100 * time.Millisecond, 250 * time.Millisecond, 500 * time.Millisecond,
	time.Second, 2500 * time.Millisecond, 5 * time.Second, 10 * time.Second,
}

var (
	descSamples = prometheus.NewDesc("ephysd_samples_total",
		"Sample frames (one sample of every channel) read from the source.", nil, nil)
	descBlocks = prometheus.NewDesc("ephysd_blocks_total",
		"Blocks read from the source (a block is block_samples sample frames of every channel).", nil, nil)
	descOverrunBlocks = prometheus.NewDesc("ephysd_overrun_blocks_total",
		"Blocks dropped because the Python stages or the recorder were behind (overruns); each leaves a gap in the recorded sample numbers.", nil, nil)
	descOverrunSamples = prometheus.NewDesc("ephysd_overrun_samples_total",
		"Sample frames lost in overruns (dropped blocks).", nil, nil)
	descGaps = prometheus.NewDesc("ephysd_gaps_total",
		"Jumps in the sample numbers reported by the source (lost packets, device unplugged); never zero-filled.", nil, nil)
	descGapSamples = prometheus.NewDesc("ephysd_gap_samples_total",
		"Sample frames missing in gaps reported by the source.", nil, nil)
	descEvents = prometheus.NewDesc("ephysd_events_total",
		"Events (TTL edges, messages, spikes, Python events) in blocks that went through the stages.", nil, nil)
	descMode = prometheus.NewDesc("ephysd_mode",
		"The daemon's state: 1 for the current mode (IDLE, ACQUIRE or RECORD), 0 for the others.", []string{"mode"}, nil)
	descQueue = prometheus.NewDesc("ephysd_queue_blocks",
		"Blocks waiting in a pipeline queue: queue=\"stages\" before the Python stages, queue=\"recorder\" before the recorder. A queue that stays full means overruns are coming.", []string{"queue"}, nil)
	descConnected = prometheus.NewDesc("ephysd_device_connected",
		"1 while a device (live source, [[input]] or [[output]]) of the running acquisition is connected, 0 while ephysd tries to reopen it.", []string{"device"}, nil)
	descDisconnects = prometheus.NewDesc("ephysd_device_disconnects_total",
		"Times a device went away (it is then reopened with backoff).", []string{"device"}, nil)
	descDiscarded = prometheus.NewDesc("ephysd_device_discarded_bytes_total",
		"Bytes from a device that belonged to no good frame (garbage, truncated or corrupted frames), dropped by the driver's parser while it found the next good frame. The samples lost with them are counted as gaps.", []string{"device"}, nil)
	descResyncs = prometheus.NewDesc("ephysd_device_resyncs_total",
		"Times a device's byte stream lost the frame boundary (a garbage burst, a truncated or corrupted frame) and the driver's parser found the next good frame.", []string{"device"}, nil)
	descDropped = prometheus.NewDesc("ephysd_output_dropped_event_blocks_total",
		"Blocks whose events could not be sent to an output device (it was disconnected or behind).", []string{"device"}, nil)
	descPyExceptions = prometheus.NewDesc("ephysd_python_exceptions_total",
		"Python exceptions raised by a stage's module (in process, a hook, or while loading or reloading it).", []string{"stage"}, nil)
	descRecorderBytes = prometheus.NewDesc("ephysd_recorder_bytes_total",
		"Bytes written to recording files (continuous.dat, sample numbers, timestamps, events, .npy headers), as of the last checkpoint (about once a second).", nil, nil)
	descStageSeconds = prometheus.NewDesc("ephysd_stage_seconds",
		"Time a Python stage took per block, in seconds.", []string{"stage"}, nil)
	descLatency = prometheus.NewDesc("ephysd_block_latency_seconds",
		"Closed-loop latency inside ephysd per block, in seconds: from the source delivering the block to its events having reached the output devices.", nil, nil)
	descRecordingFailed = prometheus.NewDesc("ephysd_recording_failed",
		"1 when the last recording stopped by itself on a write error (a full disk: see recording_error in /api/ephysd/status), until the next record start; acquisition, Python and the outputs go on.", nil, nil)
	descRecordingFailures = prometheus.NewDesc("ephysd_recording_failures_total",
		"Recordings stopped by a write error (a full disk) since ephysd started.", nil, nil)
	descCheckpoint = prometheus.NewDesc("ephysd_recorder_checkpoint_seconds",
		"Time a recorder checkpoint took, in seconds: writing the buffered data and the .npy headers, and structure.oebin (synced) when it changed. About one per second while recording.", nil, nil)
	descSpikes = prometheus.NewDesc("ephysd_spikes_total",
		"Spikes the built-in spike detector found, per electrode ([spikes]).", []string{"electrode"}, nil)
	descSpikesCut = prometheus.NewDesc("ephysd_spikes_cut_total",
		"Spikes the detector dropped because their waveform would have spanned a gap in the samples, the start or the end of acquisition.", nil, nil)
)

// NewMetrics returns the metrics of svc.
func NewMetrics(svc *Service) *Metrics {
	m := &Metrics{
		svc:             svc,
		reg:             prometheus.NewRegistry(),
		done:            newChainTotals(),
		stages:          map[PythonStage]string{},
		stageErrorsDone: map[string]uint64{},
	}
	m.reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m,
	)
	return m
}

// Handler serves the metrics (GET /metrics).
func (m *Metrics) Handler() http.Handler {
	return promhttp.InstrumentMetricHandler(m.reg, promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		Registry:      m.reg,
		ErrorHandling: promhttp.ContinueOnError,
	}))
}

// Registry is the private registry, for collectors of other parts of the
// daemon.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Describe implements prometheus.Collector.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		descSamples, descBlocks, descOverrunBlocks, descOverrunSamples, descGaps, descGapSamples, descEvents,
		descMode, descQueue, descConnected, descDisconnects, descDiscarded, descResyncs, descDropped, descPyExceptions, descRecorderBytes,
		descStageSeconds, descLatency, descCheckpoint, descRecordingFailed, descRecordingFailures,
		descSpikes, descSpikesCut,
	} {
		ch <- d
	}
}

// Collect implements prometheus.Collector: it reads the service now.
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	mode := m.svc.Mode()
	c := m.svc.Chain()
	stages := m.svc.Stages()

	m.mu.Lock()
	if m.chain != nil && m.chain != c {
		// The service no longer runs m.chain, so it has stopped: its
		// values are final.
		m.done.add(readChain(m.chain))
	}
	m.chain = c
	tot := m.done.clone()
	if c != nil {
		tot.add(readChain(c))
	}
	pyErrors := m.pythonErrors(stages)
	m.mu.Unlock()

	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter(descSamples, tot.samples)
	counter(descBlocks, tot.blocks)
	counter(descOverrunBlocks, tot.overrunBlocks)
	counter(descOverrunSamples, tot.overrunSamples)
	counter(descGaps, tot.gaps)
	counter(descGapSamples, tot.gapSamples)
	counter(descEvents, tot.events)
	counter(descRecorderBytes, tot.recorderBytes)
	for name, v := range tot.spikes {
		counter(descSpikes, v, name)
	}
	counter(descSpikesCut, tot.spikesCut)
	recErr, recFailures := m.svc.RecordingFailure()
	failed := 0.0
	if recErr != "" {
		failed = 1
	}
	gauge(descRecordingFailed, failed)
	counter(descRecordingFailures, recFailures)
	for _, md := range []Mode{Idle, Acquire, Record} {
		v := 0.0
		if md == mode {
			v = 1
		}
		gauge(descMode, v, string(md))
	}
	var qs, qr int
	if c != nil {
		qs, qr = c.Runner.QueueDepths()
		for _, d := range chainDevices(c) {
			v := 0.0
			if d.state.Connected {
				v = 1
			}
			gauge(descConnected, v, d.name)
		}
	}
	gauge(descQueue, float64(qs), "stages")
	gauge(descQueue, float64(qr), "recorder")
	for name, v := range tot.disconnects {
		counter(descDisconnects, v, name)
	}
	for name, v := range tot.link {
		counter(descDiscarded, v.DiscardedBytes, name)
		counter(descResyncs, v.Resyncs, name)
	}
	for name, v := range tot.dropped {
		counter(descDropped, v, name)
	}
	for name, v := range pyErrors {
		counter(descPyExceptions, v, name)
	}
	for name, h := range tot.stageTime {
		ch <- h.metric(descStageSeconds, name)
	}
	ch <- tot.latency.metric(descLatency)
	ch <- tot.checkpoint.metric(descCheckpoint)
}

// pythonErrors returns the exception counts by stage name: those of the
// stage objects the service has dropped since (read once more when they
// disappear: nothing runs them any more, so their counts are final) plus
// those of the current ones. m.mu is held.
func (m *Metrics) pythonErrors(current []PythonStage) map[string]uint64 {
	live := make(map[PythonStage]bool, len(current))
	for _, st := range current {
		live[st] = true
	}
	for st, name := range m.stages {
		if !live[st] {
			m.stageErrorsDone[name] += st.Status().Errors
			delete(m.stages, st)
		}
	}
	out := make(map[string]uint64, len(m.stageErrorsDone)+len(current))
	for name, v := range m.stageErrorsDone {
		out[name] = v
	}
	for _, st := range current {
		m.stages[st] = st.Name()
		out[st.Name()] += st.Status().Errors
	}
	return out
}

// chainTotals are the counters and histograms of one chain, or sums of them.
type chainTotals struct {
	samples, blocks, overrunBlocks, overrunSamples uint64
	gaps, gapSamples, events, recorderBytes        uint64
	disconnects, dropped                           map[string]uint64 // by device
	link                                           map[string]drivers.LinkStats
	stageTime                                      map[string]*histTotal
	latency, checkpoint                            histTotal
	spikes                                         map[string]uint64 // by electrode
	spikesCut                                      uint64
}

func newChainTotals() chainTotals {
	return chainTotals{
		disconnects: map[string]uint64{}, dropped: map[string]uint64{}, stageTime: map[string]*histTotal{},
		link:    map[string]drivers.LinkStats{},
		latency: newHistTotal(), checkpoint: newHistTotal(), spikes: map[string]uint64{},
	}
}

// readChain reads c's counters and histograms.
func readChain(c *Chain) chainTotals {
	t := newChainTotals()
	// The histograms first, then the counters: a histogram never counts
	// more blocks than ephysd_blocks_total although blocks go on flowing.
	if c.Recorder != nil {
		t.recorderBytes = c.Recorder.BytesWritten()
		t.checkpoint.addHistogram(c.Recorder.CheckpointTime())
	}
	t.latency.addHistogram(c.Runner.Latency())
	for i, st := range c.Stages {
		h := t.stageTime[st.Name()]
		if h == nil {
			nh := newHistTotal()
			h = &nh
			t.stageTime[st.Name()] = h
		}
		h.addHistogram(c.PythonStageTime(i))
	}
	rs := c.Runner.Stats()
	t.samples, t.blocks = rs.Samples, rs.Blocks
	t.overrunBlocks, t.overrunSamples = rs.OverrunBlocks, rs.OverrunSamples
	t.gaps, t.gapSamples, t.events = rs.Gaps, rs.GapSamples, rs.Events
	for _, d := range chainDevices(c) {
		t.disconnects[d.name] += d.state.Disconnects
		t.link[d.name] = t.link[d.name].Add(d.state.Link)
	}
	for i, o := range c.Outputs {
		t.dropped[outputName(c, i)] += o.Dropped()
	}
	for _, e := range c.spikeCounts() {
		t.spikes[e.Electrode] += e.Spikes
	}
	if c.Spikes != nil {
		t.spikesCut = c.Spikes.Cut()
	}
	return t
}

// add adds o to t.
func (t *chainTotals) add(o chainTotals) {
	t.samples += o.samples
	t.blocks += o.blocks
	t.overrunBlocks += o.overrunBlocks
	t.overrunSamples += o.overrunSamples
	t.gaps += o.gaps
	t.gapSamples += o.gapSamples
	t.events += o.events
	t.recorderBytes += o.recorderBytes
	t.spikesCut += o.spikesCut
	for k, v := range o.spikes {
		t.spikes[k] += v
	}
	for k, v := range o.disconnects {
		t.disconnects[k] += v
	}
	for k, v := range o.link {
		t.link[k] = t.link[k].Add(v)
	}
	for k, v := range o.dropped {
		t.dropped[k] += v
	}
	for k, h := range o.stageTime {
		if t.stageTime[k] == nil {
			nh := newHistTotal()
			t.stageTime[k] = &nh
		}
		t.stageTime[k].add(*h)
	}
	t.latency.add(o.latency)
	t.checkpoint.add(o.checkpoint)
}

// clone returns a deep copy of t.
func (t *chainTotals) clone() chainTotals {
	c := newChainTotals()
	c.add(*t)
	return c
}

// device is one device of a chain, named as Status names it.
type device struct {
	name  string
	state drivers.DeviceState
}

// chainDevices lists c's live source, [[input]] and [[output]] devices.
func chainDevices(c *Chain) []device {
	var out []device
	if c.Device != nil {
		out = append(out, device{fmt.Sprintf("source (%s)", c.Config.Source.Driver), c.Device.State()})
	}
	if c.Merged != nil {
		for i, d := range c.Merged.InputStates() {
			out = append(out, device{fmt.Sprintf("input %d (%s)", i+1, c.Config.Inputs[i].Driver), d})
		}
	}
	for i, o := range c.Outputs {
		out = append(out, device{outputName(c, i), o.State()})
	}
	return out
}

func outputName(c *Chain, i int) string {
	return fmt.Sprintf("output %d (%s)", i+1, c.Config.Outputs[i].Driver)
}

// histTotal is a histogram in Prometheus form: cumulative counts at
// metricBounds, the sum and the count.
type histTotal struct {
	counts []uint64
	sum    time.Duration
	n      uint64
}

func newHistTotal() histTotal { return histTotal{counts: make([]uint64, len(metricBounds))} }

func (h *histTotal) addHistogram(p *pipeline.Histogram) {
	counts, sum, n := p.Snapshot(metricBounds)
	h.add(histTotal{counts: counts, sum: sum, n: n})
}

func (h *histTotal) add(o histTotal) {
	for i, v := range o.counts {
		h.counts[i] += v
	}
	h.sum += o.sum
	h.n += o.n
}

func (h *histTotal) metric(d *prometheus.Desc, labels ...string) prometheus.Metric {
	buckets := make(map[float64]uint64, len(metricBounds))
	for i, b := range metricBounds {
		buckets[b.Seconds()] = h.counts[i]
	}
	return prometheus.MustNewConstHistogram(d, h.n, h.sum.Seconds(), buckets, labels...)
}
