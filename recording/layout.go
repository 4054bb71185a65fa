package recording

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/ephysd/ephysd/pipeline"
)

// DefaultGUIVersion is the "GUI version" written to structure.oebin and
// settings.xml. Readers choose file names by its major.minor (≥ 0.6 selects
// sample_numbers.npy & co.), and open-ephys-python-tools parses major.minor
// as a float, so it must stay of the form 1.0.x rather than 0.10.x.
const DefaultGUIVersion = "1.0.1"

// messageCenterFolder is the event folder of text messages.
const messageCenterFolder = "MessageCenter"

// sourceFolder is the folder name Open Ephys gives a stream of a processor:
// the processor's name with spaces and '@' replaced by '_', then
// -<id>.<stream>.
func sourceFolder(processorName string, processorID int, streamName string) string {
	name := strings.NewReplacer(" ", "_", "@", "_").Replace(processorName)
	return name + "-" + strconv.Itoa(processorID) + "." + streamName
}

// checkName rejects a processor or stream name that would make a folder
// name the readers cannot parse: they take the processor id as the text
// after the last '-' before the first '.'.
func checkName(what, name string, noDash bool) error {
	switch {
	case name == "":
		return fmt.Errorf("recording: %s is empty", what)
	case strings.ContainsAny(name, "./\\\x00"):
		return fmt.Errorf("recording: %s %q contains '.', '/' or '\\': readers split folder names on '.' — rename it", what, name)
	case noDash && strings.Contains(name, "-"):
		return fmt.Errorf("recording: %s %q contains '-': readers take the processor id after the last '-' — use '_' instead", what, name)
	}
	return nil
}

// oebin is structure.oebin.
type oebin struct {
	GUIVersion string            `json:"GUI version"`
	Continuous []oebinContinuous `json:"continuous"`
	Events     []oebinEvent      `json:"events"`
	Spikes     []oebinSpike      `json:"spikes"`
}

type oebinContinuous struct {
	FolderName          string         `json:"folder_name"`
	SampleRate          float64        `json:"sample_rate"`
	SourceProcessorName string         `json:"source_processor_name"`
	SourceProcessorID   int            `json:"source_processor_id"`
	StreamName          string         `json:"stream_name"`
	RecordedProcessor   string         `json:"recorded_processor"`
	RecordedProcessorID int            `json:"recorded_processor_id"`
	NumChannels         int            `json:"num_channels"`
	Channels            []oebinChannel `json:"channels"`
}

type oebinChannel struct {
	ChannelName string  `json:"channel_name"`
	Description string  `json:"description"`
	Identifier  string  `json:"identifier"`
	History     string  `json:"history"`
	BitVolts    float64 `json:"bit_volts"`
	Units       string  `json:"units"`
}

type oebinEvent struct {
	FolderName      string  `json:"folder_name"`
	ChannelName     string  `json:"channel_name"`
	Description     string  `json:"description"`
	Identifier      string  `json:"identifier"`
	SampleRate      float64 `json:"sample_rate"`
	Type            string  `json:"type"`
	NumChannels     int     `json:"num_channels"`
	SourceProcessor string  `json:"source_processor"`
	StreamName      string  `json:"stream_name"`
	InitialState    *int    `json:"initial_state,omitempty"`
}

// oebinSpike is one electrode (spike channel) of structure.oebin's "spikes"
// list, with the fields Open Ephys 1.0 writes (open-ephys-python-tools
// reads name, stream_name, sample_rate, num_channels, folder and
// source_channels[0].bit_volts). Folder is relative to spikes/ and ends in
// '/'. SourceProcessorName is ephysd's addition.
type oebinSpike struct {
	Name                string              `json:"name"`
	Description         string              `json:"description"`
	Identifier          string              `json:"identifier"`
	SourceProcessorID   int                 `json:"source_processor_id"`
	SourceProcessorName string              `json:"source_processor_name"`
	StreamName          string              `json:"stream_name"`
	SampleRate          float64             `json:"sample_rate"`
	NumChannels         int                 `json:"num_channels"`
	PrePeakSamples      int                 `json:"pre_peak_samples"`
	PostPeakSamples     int                 `json:"post_peak_samples"`
	Folder              string              `json:"folder"`
	SourceChannels      []oebinSpikeChannel `json:"source_channels"`
}

// oebinSpikeChannel is one channel of an electrode: its continuous
// channel's name and index in the stream, and the resolution of
// waveforms.npy (int16 × bit_volts = µV).
type oebinSpikeChannel struct {
	Name       string  `json:"name"`
	LocalIndex int     `json:"local_index"`
	BitVolts   float64 `json:"bit_volts"`
}

// marshalOebin renders structure.oebin as Open Ephys does (indented JSON).
func marshalOebin(o *oebin) ([]byte, error) {
	if o.Events == nil {
		o.Events = []oebinEvent{}
	}
	if o.Spikes == nil {
		o.Spikes = []oebinSpike{}
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(o); err != nil {
		return nil, fmt.Errorf("recording: encode structure.oebin: %w", err)
	}
	return buf.Bytes(), nil
}

// syncMessages renders sync_messages.txt: the software time and, per stream,
// the first recorded sample number. Lines end in CRLF as Open Ephys writes
// them.
func syncMessages(at time.Time, streams []*contStream, first int64) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "Software Time (milliseconds since midnight Jan 1st 1970 UTC): %d\r\n", at.UnixMilli())
	for _, s := range streams {
		fmt.Fprintf(&b, "Start Time for %s (%d) - %s @ %s Hz: %d\r\n",
			s.info.ProcessorName, s.info.ProcessorID, s.name,
			strconv.FormatFloat(s.info.SampleRate, 'f', -1, 64), first)
	}
	return []byte(b.String())
}

// settingsXML renders the minimal settings.xml that tools reading it
// (SpikeInterface, probeinterface) accept: <SETTINGS><INFO><VERSION>.
func settingsXML(guiVersion string, at time.Time, stream pipeline.StreamInfo) []byte {
	esc := func(s string) string {
		var b strings.Builder
		_ = xml.EscapeText(&b, []byte(s))
		return b.String()
	}
	host, _ := os.Hostname()
	var b strings.Builder
	b.WriteString("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\n")
	b.WriteString("<SETTINGS>\n  <INFO>\n")
	fmt.Fprintf(&b, "    <VERSION>%s</VERSION>\n", esc(guiVersion))
	b.WriteString("    <PLUGIN_API_VERSION>9</PLUGIN_API_VERSION>\n")
	fmt.Fprintf(&b, "    <DATE>%s</DATE>\n", esc(at.Format("2 Jan 2006 15:04:05")))
	b.WriteString("    <OS>Linux</OS>\n")
	fmt.Fprintf(&b, "    <MACHINE name=\"%s\"/>\n", esc(host))
	b.WriteString("    <SOFTWARE>ephysd</SOFTWARE>\n")
	b.WriteString("  </INFO>\n")
	fmt.Fprintf(&b, "  <SIGNALCHAIN>\n    <PROCESSOR name=\"%s\" nodeId=\"%d\">\n", esc(stream.ProcessorName), stream.ProcessorID)
	fmt.Fprintf(&b, "      <STREAM name=\"%s\" sample_rate=\"%s\" channel_count=\"%d\"/>\n",
		esc(stream.StreamName), strconv.FormatFloat(stream.SampleRate, 'f', -1, 64), len(stream.Channels))
	b.WriteString("    </PROCESSOR>\n  </SIGNALCHAIN>\n</SETTINGS>\n")
	return []byte(b.String())
}

// settingsPath is the settings file of experiment e in a record node folder:
// settings.xml for the first, settings_<e>.xml for the others.
func settingsPath(nodeDir string, experiment int) string {
	if experiment <= 1 {
		return filepath.Join(nodeDir, "settings.xml")
	}
	return filepath.Join(nodeDir, "settings_"+strconv.Itoa(experiment)+".xml")
}
