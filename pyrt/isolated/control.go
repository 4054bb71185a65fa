package isolated

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/ephysd/ephysd/pyrt"
)

// The control channel is a SOCK_SEQPACKET socket pair: one JSON message per
// packet, in both directions. It carries what is not per block: the
// worker's configuration and its answer, reload and status requests, and
// the worker's log lines. Blocks and hooks go through the shared memory.

// Message types.
const (
	msgStart     = "start"      // parent → worker: the configuration (first message)
	msgReady     = "ready"      // worker → parent: Python started, module loaded (or why not)
	msgReload    = "reload"     // parent → worker: re-import the module
	msgSetModule = "set_module" // parent → worker: load another module file
	msgReshape   = "reshape"    // parent → worker: new channel count / rate
	msgStatus    = "status"     // parent → worker: report the stage's status
	msgChannel   = "channel"    // parent → worker: the name of a processor's event channel
	msgReply     = "reply"      // worker → parent: the answer to a request with the same ID
	msgLog       = "log"        // worker → parent: a log entry
)

// maxPacket bounds one control message; longer texts are cut.
const (
	maxPacket = 192 << 10
	maxText   = 64 << 10
)

// message is one control packet. Which fields are set depends on Type.
type message struct {
	Type string `json:"t"`
	ID   uint64 `json:"id,omitempty"`

	Start *startConfig `json:"start,omitempty"`

	Path     string  `json:"path,omitempty"`
	Channels int     `json:"channels,omitempty"`
	Rate     float64 `json:"rate,omitempty"`
	Node     int     `json:"node,omitempty"`
	Name     string  `json:"name,omitempty"`

	// Replies and ready.
	Err     string            `json:"err,omitempty"`   // a failure that is not a load error
	Load    *pyrt.LoadError   `json:"load,omitempty"`  // the module did not import / construct
	Fatal   string            `json:"fatal,omitempty"` // ready: the worker cannot serve at all
	Status  *pyrt.StageStatus `json:"status,omitempty"`
	Version string            `json:"version,omitempty"` // ready: Python and numpy versions

	// Log entries.
	Level  int8           `json:"level,omitempty"`
	Msg    string         `json:"msg,omitempty"`
	Fields map[string]any `json:"fields,omitempty"`
}

// startConfig is what a worker needs to serve one stage.
type startConfig struct {
	Stage          pyrt.StageConfig
	Executable     string
	Venv           string
	SwitchInterval time.Duration
	BlockTimeout   time.Duration
	ShmSize        int
	Channels       map[int]string // event channel names by processor id
}

func (m *message) err() error {
	switch {
	case m.Load != nil:
		return m.Load
	case m.Err != "":
		return errors.New(m.Err)
	}
	return nil
}

func cut(s string) string {
	if len(s) <= maxText {
		return s
	}
	s = s[:maxText]
	for len(s) > 0 && !utf8.ValidString(s) {
		s = s[:len(s)-1]
	}
	return s + " …(cut)"
}

// conn is one end of the control channel.
type conn struct {
	c *net.UnixConn
}

func newConn(f *os.File) (*conn, error) {
	c, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("control channel is a %T, not a unix socket", c)
	}
	return &conn{c: uc}, nil
}

func (c *conn) send(m *message) error {
	m.Msg, m.Err, m.Fatal = cut(m.Msg), cut(m.Err), cut(m.Fatal)
	if m.Load != nil {
		l := *m.Load
		l.Traceback = cut(l.Traceback)
		m.Load = &l
	}
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	if len(b) > maxPacket {
		return fmt.Errorf("control message %q of %d bytes is too long", m.Type, len(b))
	}
	_, err = c.c.Write(b)
	return err
}

// receive reads one message into buf's space; deadline zero waits forever.
func (c *conn) receive(buf []byte, deadline time.Time) (*message, error) {
	c.c.SetReadDeadline(deadline)
	n, err := c.c.Read(buf)
	if err != nil {
		return nil, err
	}
	if n == 0 {
		return nil, errors.New("control channel closed")
	}
	m := &message{}
	if err := json.Unmarshal(buf[:n], m); err != nil {
		return nil, fmt.Errorf("control message: %w", err)
	}
	return m, nil
}

func (c *conn) close() error { return c.c.Close() }

// logCore is the worker's zap core: it sends every entry to the parent,
// which logs it with its own logger.
type logCore struct {
	c      *conn
	fields []zapcore.Field
	level  zapcore.LevelEnabler
}

func (l *logCore) Enabled(lvl zapcore.Level) bool { return l.level.Enabled(lvl) }

func (l *logCore) With(fs []zapcore.Field) zapcore.Core {
	return &logCore{c: l.c, level: l.level, fields: append(append([]zapcore.Field(nil), l.fields...), fs...)}
}

func (l *logCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if l.Enabled(e.Level) {
		return ce.AddCore(e, l)
	}
	return ce
}

func (l *logCore) Write(e zapcore.Entry, fs []zapcore.Field) error {
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range l.fields {
		f.AddTo(enc)
	}
	for _, f := range fs {
		f.AddTo(enc)
	}
	for k, v := range enc.Fields {
		if s, ok := v.(string); ok {
			enc.Fields[k] = cut(s)
		}
	}
	return l.c.send(&message{Type: msgLog, Level: int8(e.Level), Msg: e.Message, Fields: enc.Fields})
}

func (l *logCore) Sync() error { return nil }

// relog logs a worker's entry with the parent's logger.
func relog(log *zap.Logger, m *message, pid int) {
	ce := log.Check(zapcore.Level(m.Level), m.Msg)
	if ce == nil {
		return
	}
	keys := make([]string, 0, len(m.Fields))
	for k := range m.Fields {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	fs := make([]zap.Field, 0, len(keys)+1)
	for _, k := range keys {
		fs = append(fs, zap.Any(k, m.Fields[k]))
	}
	fs = append(fs, zap.Int("worker_pid", pid))
	ce.Write(fs...)
}
