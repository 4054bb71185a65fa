package pipeline

// StreamInfo describes a source's continuous stream, in the terms the Open
// Ephys format uses.
type StreamInfo struct {
	ProcessorName string  // e.g. "Simulated Headstage"
	ProcessorID   int     // e.g. 100
	StreamName    string  // e.g. "sim"; no '-' (readers split folder names on it)
	SampleRate    float64 // Hz
	Channels      []ChannelInfo
	// TTLLines is how many digital input lines the source has (0–64).
	TTLLines int
	// TTLChannelName names the source's TTL event channel ("TTL Input").
	TTLChannelName string
}

// ChannelInfo describes one continuous channel.
type ChannelInfo struct {
	Name        string  // "CH1"
	Units       string  // "uV" for headstage channels, "V" for ADC/aux
	BitVolts    float64 // recording resolution: int16 value × BitVolts = Units
	Description string
}
