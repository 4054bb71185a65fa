// ephys_py.h — the C side of pyrt: the only code in ephysd that touches
// PyObject. Go holds ephys_stage pointers as opaque handles.
#ifndef EPHYS_PY_H
#define EPHYS_PY_H

#include <signal.h>
#include <stdint.h>

#define EPHYS_MAX_EVENTS 4096

// ephys_out_event is one add_python_event call, read by Go after process.
typedef struct {
	int32_t line;
	int32_t state;
	int64_t sample; // -1: stamp with the block's first sample number
} ephys_out_event;

// ephys_out_spike is one add_python_spike call, read by Go after process.
// The electrode name is name_len bytes at name_off in
// ephys_stage_spike_names; the waveform, channels × samples floats
// (channel-major, uV), is at wave_off in ephys_stage_spike_waves, or, when
// from_block >= 0, that of the block's spike of that index (waveform=None).
typedef struct {
	int64_t sample;
	int64_t wave_off;
	int32_t sorted_id;
	int32_t channels, samples;
	int32_t from_block;
	int32_t name_off, name_len;
} ephys_out_spike;

#define EPHYS_MAX_SPIKES 1024           // per block and stage; more are dropped and counted
#define EPHYS_MAX_SPIKE_VALUES 65536    // channels × samples of one waveform
#define EPHYS_MAX_ELECTRODE_NAME 255    // bytes

typedef struct ephys_stage ephys_stage;

// Interpreter.
int ephys_init(const char *program, const char *stdlib_check, double switch_interval, char **err);
int ephys_is_initialized(void);
const char *ephys_linked_version(void);
char *ephys_sys_info(void); // "prefix\nexecutable\nversion\nnumpy version" (malloc'd)
int ephys_on_thread(void);

// Stages. ephys_stage_load runs on any thread (it takes the GIL itself).
ephys_stage *ephys_stage_new(int id, const char *name);
int ephys_stage_load(ephys_stage *st, const char *path, const char *modname, int channels, double rate, char **err);
int ephys_stage_commit(ephys_stage *st);   // interpreter thread: the loaded instance becomes current
void ephys_stage_discard(ephys_stage *st); // any thread: drop a loaded instance not committed
int ephys_stage_has_current(ephys_stage *st);
void ephys_stage_set_accepting(ephys_stage *st, int on);

// Calls on the interpreter thread. Return 0 on success, 1 if Python raised
// (the exception is kept in the stage), 2 if the member does not exist,
// -1 if called from the wrong thread, with these flags or-ed in:
// EPHYS_TIMED_OUT if the watchdog interrupted the call (ephys_interrupt),
// EPHYS_ABANDONED if it gave up waiting for it (ephys_abandon), and, from
// ephys_stage_process, EPHYS_RETAINED when the script kept a view of data
// after process returned.
int ephys_stage_process(ephys_stage *st, float *data, int channels, int samples, int64_t first);
#define EPHYS_RETAINED 0x100
#define EPHYS_TIMED_OUT 0x200
#define EPHYS_ABANDONED 0x400
int ephys_stage_ttl(ephys_stage *st, int source_node, int line, int state, int64_t sample);
int ephys_stage_spike(ephys_stage *st, int source_node, const char *electrode, int channels, int samples,
                      int64_t sample, int sorted_id, const float *waveform);
int ephys_stage_hook(ephys_stage *st, int which, const char *arg); // see EPHYS_HOOK_*

#define EPHYS_HOOK_START_ACQ 0
#define EPHYS_HOOK_STOP_ACQ 1
#define EPHYS_HOOK_START_REC 2
#define EPHYS_HOOK_STOP_REC 3

// Events queued by add_python_event since the last reset.
ephys_out_event *ephys_stage_events(ephys_stage *st);
int ephys_stage_nevents(ephys_stage *st);
int64_t ephys_stage_dropped(ephys_stage *st);
void ephys_stage_events_reset(ephys_stage *st); // and the spikes

// The block a stage is about to get (handlers, then process): the range of
// sample numbers add_python_event and add_python_spike accept. Spikes may
// lie up to spike_lookback samples before the block.
void ephys_stage_set_block(ephys_stage *st, int64_t first, int samples, int64_t spike_lookback);
// Spikes queued by add_python_spike since the last reset.
ephys_out_spike *ephys_stage_spikes(ephys_stage *st);
int ephys_stage_nspikes(ephys_stage *st);
int64_t ephys_stage_spikes_dropped(ephys_stage *st);
const char *ephys_stage_spike_names(ephys_stage *st);
const float *ephys_stage_spike_waves(ephys_stage *st);
void ephys_stage_spikes_reset(ephys_stage *st);

// The last exception, formatted (full traceback or its last line); NULL if
// none. Clears it. Result is malloc'd. full < 0 only clears.
char *ephys_stage_error(ephys_stage *st, int full);

// Event channel names passed to handle_ttl_event, by source processor id.
int ephys_register_channel(int processor_id, const char *name);

// The signal that interrupts the interpreter thread (SIGRTMIN+6). Python's
// own C handler is installed for it (signal.signal, no SA_RESTART), which
// makes blocking calls return EINTR; its Python-level handler raises
// TimeoutError in the call the watchdog asked to interrupt.
#define EPHYS_INTERRUPT_SIGNAL (SIGRTMIN + 6)
int ephys_interrupt_signal(void);

// Make the per-block call `call`, if it is still running, raise TimeoutError
// with msg: at its next bytecode, or when the blocking call it is in returns
// EINTR. Any thread, without the GIL; may be repeated. Returns 1 if it
// signalled the interpreter thread.
int ephys_interrupt(int64_t call, const char *msg);
// Give up waiting for call `call`: if it is still running, it is marked
// abandoned (its end reports EPHYS_ABANDONED) and 1 is returned. Any thread.
int ephys_abandon(int64_t call);
// The id of the latest per-block call, its state (0 ended, 1 running, 2
// abandoned), its stage id and what it calls.
int64_t ephys_call_state(int *status, int *stage, const char **what);

// Run Python source on the interpreter thread (tests, diagnostics).
int ephys_run_string(const char *code, char **err);

#endif
