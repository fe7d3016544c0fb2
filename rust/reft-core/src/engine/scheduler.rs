//! Continuous batching: requests join and leave a running batch at token
//! boundaries, each with its own adapter (or none), options and KV cache.
//!
//! [`Scheduler::submit`], [`Scheduler::cancel`] and [`Scheduler::load`] only
//! touch a small inbox or counters, so they return at once even while
//! [`Scheduler::step`] computes. At most `max_waiting` requests wait, and
//! one client (each request names its own) holds at most half of them; a
//! request past either is refused at `submit` ([`Error::Busy`]).
//!
//! Each step takes the inbox and admits waiting requests while the batch
//! has room: at most `max_batch` sequences, their reserved key/value cache
//! within `kv_cache_bytes`, at most `max_prefill_tokens` prompt tokens per
//! step. Clients take turns (a client's own requests go in order); a
//! request that does not fit holds back only its own client's, and one
//! passed over for [`PATIENCE`] steps holds back every later admission
//! until it fits, so no request waits for ever. Then the step runs one
//! forward pass over the prompts of the newcomers and the last token of
//! every running sequence together, and picks each sequence's next token.
//! A request's whole cache (prompt plus every token it may generate) is
//! reserved when it is admitted, so a running sequence never runs out of
//! memory; a request larger than the whole budget is refused at `submit`.
//!
//! Rows of one call are independent: each sequence attends only to its own
//! cache, its edits come from its own checkpoint and positions, and its
//! sampling from its own generator seeded by its request, so a sequence gets
//! the same tokens in any batch as it gets alone.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::edits::{BatchEdits, EditSet, Span};
use super::model::SeqCache;
use super::reply::ReplyText;
use super::weights::with_rows;
use super::{sample, Engine, GenerateOptions};
use crate::error::{Error, Result};

/// One generation request.
#[derive(Debug, Clone)]
pub struct Request {
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Name of a loaded adapter ([`Engine::add_adapter`]); `None` runs with
    /// the checkpoint the engine was loaded with, if any.
    pub adapter: Option<String>,
    /// Length, sampling, stop strings, editing of generated tokens.
    pub options: GenerateOptions,
    /// Report the logits each token was chosen from (for checks; costs a
    /// copy of the vocabulary per token).
    pub return_logits: bool,
    /// Who sent it (a user, an address): clients take turns at admission.
    /// `None` is one client of its own.
    pub client: Option<String>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_new_tokens`, or the end of the model's context.
    Length,
    /// [`Scheduler::cancel`].
    Cancelled,
    /// The forward pass failed (the message says why); the scheduler goes on.
    Error(String),
}

impl Finish {
    /// `"stop"`, `"length"`, `"cancelled"` or `"error"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::Cancelled => "cancelled",
            Finish::Error(_) => "error",
        }
    }
}

/// What happened to one request in one step.
#[derive(Debug, Clone)]
pub struct Event {
    /// The request, as [`Scheduler::submit`] numbered it.
    pub id: u64,
    /// The token generated in this step (`None` when the step ended the
    /// request without one: end of sequence, cancellation, error).
    pub token: Option<u32>,
    /// Set on the request's last event.
    pub finish: Option<Finish>,
    /// The logits the token was chosen from, when the request asked.
    pub logits: Option<Vec<f32>>,
    /// The reply's text to hand out now (see [`ReplyText`]): empty while a
    /// character is incomplete or could begin a stop string, and when the
    /// model has no tokenizer. Joined, a request's pieces are its reply,
    /// cut before the first stop string.
    pub text: String,
}

/// Limits of a [`Scheduler`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerOptions {
    /// Most sequences in one forward pass.
    pub max_batch: usize,
    /// Most bytes of key/value cache reserved at once.
    pub kv_cache_bytes: usize,
    /// Most prompt tokens prefilled in one step (a longer prompt still runs,
    /// alone among the newcomers of its step).
    pub max_prefill_tokens: usize,
    /// Most requests waiting for a place; `submit` refuses more.
    pub max_waiting: usize,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions {
            max_batch: 32,
            kv_cache_bytes: 2 << 30,
            max_prefill_tokens: 2048,
            max_waiting: 4096,
        }
    }
}

/// A request checked and waiting for a place in the batch.
struct Waiting {
    id: u64,
    prompt: Vec<u32>,
    set: Option<Arc<EditSet>>,
    options: GenerateOptions,
    return_logits: bool,
    /// Tokens it may generate (`max_new_tokens`, cut at the context's end).
    max_new: usize,
    /// Key/value cache it reserves.
    bytes: usize,
    client: Option<String>,
    /// Steps in which it was next for its client and did not fit.
    passed_over: usize,
}

/// Steps a request may be passed over (it did not fit while others were
/// admitted) before every other admission waits for it.
pub const PATIENCE: usize = 64;

/// A sequence in the batch.
struct Running {
    request: Waiting,
    cache: SeqCache,
    rng: sample::Rng,
    generated: Vec<u32>,
    /// The reply's text (`None`: the model has no tokenizer).
    reply: Option<ReplyText>,
    /// The token to feed next; `None` before the prompt is prefilled.
    next: Option<u32>,
}

#[derive(Default)]
struct Inbox {
    new: Vec<Waiting>,
    cancel: Vec<u64>,
    /// Requests of each client submitted and not yet admitted or ended.
    per_client: HashMap<Option<String>, usize>,
}

#[derive(Default)]
struct State {
    waiting: VecDeque<Waiting>,
    running: Vec<Running>,
    reserved: usize,
    /// The admission count at each client's last admission (turns go to
    /// the client served longest ago).
    served: HashMap<Option<String>, u64>,
    admitted: u64,
}

/// Continuous batching over one [`Engine`] (see the module documentation).
pub struct Scheduler {
    engine: Arc<Engine>,
    options: SchedulerOptions,
    inbox: Mutex<Inbox>,
    signal: Condvar,
    state: Mutex<State>,
    next_id: AtomicU64,
    /// Whether sequences are waiting or running (so `wait` need not lock `state`).
    busy: AtomicBool,
    /// `(waiting, running, reserved)` as of the last step, and the requests
    /// submitted since (so `load` and `submit` need not lock `state`).
    waiting: AtomicUsize,
    running: AtomicUsize,
    reserved: AtomicUsize,
    queued: AtomicUsize,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Scheduler {
    /// A scheduler with nothing to do yet.
    pub fn new(engine: Arc<Engine>, options: SchedulerOptions) -> Result<Self> {
        if options.max_batch == 0 || options.max_prefill_tokens == 0 || options.max_waiting == 0 {
            return Err(Error::InvalidArgument(
                "max_batch, max_prefill_tokens and max_waiting must be at least 1".into(),
            ));
        }
        if options.kv_cache_bytes == 0 {
            return Err(Error::InvalidArgument(
                "kv_cache_bytes must be at least 1".into(),
            ));
        }
        Ok(Scheduler {
            engine,
            options,
            inbox: Mutex::default(),
            signal: Condvar::new(),
            state: Mutex::default(),
            next_id: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
        })
    }

    /// The engine it runs on.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Its limits.
    pub fn options(&self) -> &SchedulerOptions {
        &self.options
    }

    /// Bytes of key/value cache a sequence of `tokens` tokens holds.
    pub fn kv_bytes(&self, tokens: usize) -> usize {
        let c = self.engine.config();
        tokens
            .saturating_mul(c.num_hidden_layers)
            .saturating_mul(2 * self.engine.model.kv_width())
            .saturating_mul(std::mem::size_of::<f32>())
    }

    /// Checks `request` and queues it; returns its id. Fails at once, with
    /// nothing queued, for an empty prompt, a token outside the vocabulary,
    /// a prompt longer than the model's context, bad sampling settings, an
    /// unknown adapter, or a request whose cache exceeds the whole budget;
    /// and with [`Error::Busy`] when `max_waiting` requests wait already.
    pub fn submit(&self, request: Request) -> Result<u64> {
        let Request {
            prompt,
            adapter,
            options,
            return_logits,
            client,
        } = request;
        options.sampling.validate()?;
        if !options.strength.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "the edit strength must be a finite number, found {}",
                options.strength
            )));
        }
        let config = self.engine.config();
        if prompt.is_empty() {
            return Err(Error::InvalidArgument("the prompt has no tokens".into()));
        }
        if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= config.vocab_size) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                config.vocab_size
            )));
        }
        let context = config.max_position_embeddings;
        if prompt.len() > context {
            return Err(Error::InvalidArgument(format!(
                "the prompt has {} tokens, more than the model's context of {context}",
                prompt.len()
            )));
        }
        if !options.stop.is_empty() && self.engine.text().is_none() {
            return Err(Error::Tokenizer(
                "stop strings need a tokenizer, and the model has none".into(),
            ));
        }
        let set = self.engine.resolve_adapter(adapter.as_deref())?;
        // The last token is never fed back, so a full context still yields one.
        let max_new = options.max_new_tokens.min(context + 1 - prompt.len());
        let bytes = self.kv_bytes(prompt.len() + max_new.saturating_sub(1));
        if bytes > self.options.kv_cache_bytes {
            return Err(Error::Allocation(format!(
                "the request needs {} MiB of key/value cache ({} prompt tokens, up to {max_new} new), more than the whole budget of {} MiB",
                bytes >> 20,
                prompt.len(),
                self.options.kv_cache_bytes >> 20
            )));
        }
        let mut inbox = lock(&self.inbox);
        let waiting = self.waiting.load(Ordering::Acquire) + inbox.new.len();
        if waiting >= self.options.max_waiting {
            return Err(Error::Busy(format!(
                "{waiting} requests are waiting already, the most the scheduler queues"
            )));
        }
        // One client may fill half the queue, so others always find room.
        let share = self.options.max_waiting.div_ceil(2);
        let mine = inbox.per_client.get(&client).copied().unwrap_or(0);
        if mine >= share {
            return Err(Error::Busy(format!(
                "this client has {mine} requests waiting already, the most one client may queue"
            )));
        }
        *inbox.per_client.entry(client.clone()).or_insert(0) += 1;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        inbox.new.push(Waiting {
            id,
            prompt,
            set,
            options,
            return_logits,
            max_new,
            bytes,
            client,
            passed_over: 0,
        });
        self.queued.store(inbox.new.len(), Ordering::Release);
        drop(inbox);
        self.signal.notify_all();
        Ok(id)
    }

    /// Ends request `id` at the next step (an event with
    /// [`Finish::Cancelled`] says so) and frees its place; unknown or
    /// finished ids are ignored.
    pub fn cancel(&self, id: u64) {
        lock(&self.inbox).cancel.push(id);
        self.signal.notify_all();
    }

    /// Whether anything is submitted, waiting or running.
    pub fn has_work(&self) -> bool {
        if self.busy.load(Ordering::Acquire) {
            return true;
        }
        let inbox = lock(&self.inbox);
        !inbox.new.is_empty() || !inbox.cancel.is_empty()
    }

    /// Blocks until there is work or `timeout` has passed; returns [`Scheduler::has_work`].
    pub fn wait(&self, timeout: Duration) -> bool {
        if self.busy.load(Ordering::Acquire) {
            return true;
        }
        let inbox = lock(&self.inbox);
        let (inbox, _) = self
            .signal
            .wait_timeout_while(inbox, timeout, |i| i.new.is_empty() && i.cancel.is_empty())
            .unwrap_or_else(|p| p.into_inner());
        !inbox.new.is_empty() || !inbox.cancel.is_empty() || self.busy.load(Ordering::Acquire)
    }

    /// `(waiting, running, reserved cache bytes)`: running and reserved as
    /// of the last step, waiting counting the requests submitted since.
    /// Takes no lock that a step holds.
    pub fn load(&self) -> (usize, usize, usize) {
        (
            self.waiting.load(Ordering::Acquire) + self.queued.load(Ordering::Acquire),
            self.running.load(Ordering::Acquire),
            self.reserved.load(Ordering::Acquire),
        )
    }

    /// Takes in new requests and cancellations, admits what fits, runs one
    /// forward pass and returns what happened to each request.
    pub fn step(&self) -> Result<Vec<Event>> {
        let mut state = lock(&self.state);
        let state = &mut *state;
        let mut events = Vec::new();
        let mut departed = Vec::new();
        let cancel = {
            let mut inbox = lock(&self.inbox);
            let taken = (
                std::mem::take(&mut inbox.new),
                std::mem::take(&mut inbox.cancel),
            );
            state.waiting.extend(taken.0);
            self.publish(state);
            taken.1
        };
        if !cancel.is_empty() {
            // One pass over the queue and the batch, however many ids.
            let cancel: HashSet<u64> = cancel.into_iter().collect();
            let cancelled = |id| Event {
                id,
                token: None,
                finish: Some(Finish::Cancelled),
                logits: None,
                text: String::new(),
            };
            state.waiting.retain(|w| {
                let keep = !cancel.contains(&w.id);
                if !keep {
                    events.push(cancelled(w.id));
                    departed.push(w.client.clone());
                }
                keep
            });
            let mut freed = 0;
            state.running.retain(|r| {
                let keep = !cancel.contains(&r.request.id);
                if !keep {
                    freed += r.request.bytes;
                    events.push(cancelled(r.request.id));
                }
                keep
            });
            state.reserved -= freed;
        }
        self.admit(state, &mut events, &mut departed);
        if !departed.is_empty() {
            let mut inbox = lock(&self.inbox);
            for client in departed {
                if let Some(count) = inbox.per_client.get_mut(&client) {
                    *count -= 1;
                    if *count == 0 {
                        inbox.per_client.remove(&client);
                    }
                }
            }
        }
        self.publish(state);
        if !state.running.is_empty() {
            self.decode(state, &mut events);
        }
        self.publish(state);
        Ok(events)
    }

    /// The counters `load`, `wait` and `submit` read without the state's lock.
    fn publish(&self, state: &State) {
        self.waiting.store(state.waiting.len(), Ordering::Release);
        self.queued.store(0, Ordering::Release);
        self.running.store(state.running.len(), Ordering::Release);
        self.reserved.store(state.reserved, Ordering::Release);
        self.busy.store(
            !state.running.is_empty() || !state.waiting.is_empty(),
            Ordering::Release,
        );
    }

    /// Admits what fits; `departed` gets the client of each request that
    /// leaves the queue.
    fn admit(
        &self,
        state: &mut State,
        events: &mut Vec<Event>,
        departed: &mut Vec<Option<String>>,
    ) {
        let layers = self.engine.config().num_hidden_layers;
        let width = self.engine.model.kv_width();
        // Requests with nothing to generate end at once.
        state.waiting.retain(|w| {
            if w.max_new == 0 {
                events.push(Event {
                    id: w.id,
                    token: None,
                    finish: Some(Finish::Length),
                    logits: None,
                    text: String::new(),
                });
                departed.push(w.client.clone());
            }
            w.max_new > 0
        });
        let mut prefill = 0;
        let mut blocked: HashSet<Option<String>> = HashSet::new();
        loop {
            // Each client's first waiting request, the client served longest
            // ago first (then the older request).
            let mut seen = HashSet::new();
            let mut fronts: Vec<(u64, usize)> = Vec::new();
            for (at, w) in state.waiting.iter().enumerate() {
                if !blocked.contains(&w.client) && seen.insert(&w.client) {
                    let last = state.served.get(&w.client).copied().unwrap_or(0);
                    fronts.push((last, at));
                }
            }
            let Some(&(_, at)) = fronts.iter().min() else {
                break;
            };
            let front = &state.waiting[at];
            let fits = state.running.len() < self.options.max_batch
                && state.reserved + front.bytes <= self.options.kv_cache_bytes
                && (prefill == 0
                    || prefill + front.prompt.len() <= self.options.max_prefill_tokens);
            if !fits {
                if state.running.len() >= self.options.max_batch {
                    break;
                }
                let front = &mut state.waiting[at];
                front.passed_over += 1;
                if front.passed_over > PATIENCE {
                    break; // everyone waits until it fits
                }
                blocked.insert(front.client.clone());
                continue;
            }
            let request = state.waiting.remove(at).expect("a front");
            departed.push(request.client.clone());
            prefill += request.prompt.len();
            state.reserved += request.bytes;
            state.admitted += 1;
            state.served.insert(request.client.clone(), state.admitted);
            let capacity = request.prompt.len() + request.max_new;
            state.running.push(Running {
                cache: SeqCache::new(layers, width, capacity),
                rng: sample::Rng::new(request.options.sampling.seed),
                generated: Vec::with_capacity(request.max_new),
                reply: self
                    .engine
                    .text()
                    .map(|_| ReplyText::new(&request.options.stop)),
                next: None,
                request,
            });
        }
        // Clients with nothing waiting need no turn kept.
        if state.served.len() > 2 * state.waiting.len() + 64 {
            let waiting: HashSet<&Option<String>> =
                state.waiting.iter().map(|w| &w.client).collect();
            state.served.retain(|c, _| waiting.contains(c));
        }
    }

    fn decode(&self, state: &mut State, events: &mut Vec<Event>) {
        let engine = &self.engine;
        let mut ids = Vec::new();
        let mut counts = Vec::with_capacity(state.running.len());
        let mut spans = Vec::with_capacity(state.running.len());
        // The checkpoints, held apart from the sequences whose caches the pass fills.
        let sets: Vec<Option<Arc<EditSet>>> = state
            .running
            .iter()
            .map(|s| s.request.set.clone())
            .collect();
        for (seq, set) in state.running.iter_mut().zip(&sets) {
            let first_row = ids.len();
            let span = |first_row, tokens, prompt| Span {
                set: set.as_deref(),
                first_row,
                tokens,
                prompt,
                on_generated: seq.request.options.intervene_on_generated,
                strength: seq.request.options.strength,
            };
            match seq.next {
                None => {
                    ids.extend_from_slice(&seq.request.prompt);
                    spans.push(span(first_row, ids.len() - first_row, true));
                }
                // Past the length where the rotation changes (LongRoPE), the
                // whole sequence runs again on an empty cache, as transformers
                // generates: its prompt edited as a prompt, its tokens as generated.
                Some(_) if engine.model.restarts_after(seq.cache.len) => {
                    seq.cache.clear();
                    let prompt = seq.request.prompt.len();
                    ids.extend_from_slice(&seq.request.prompt);
                    ids.extend_from_slice(&seq.generated);
                    spans.push(span(first_row, prompt, true));
                    spans.push(span(first_row + prompt, seq.generated.len(), false));
                }
                Some(token) => {
                    ids.push(token);
                    spans.push(span(first_row, 1, false));
                }
            }
            counts.push(ids.len() - first_row);
        }
        let result = {
            let mut caches: Vec<&mut SeqCache> =
                state.running.iter_mut().map(|s| &mut s.cache).collect();
            engine.run(|| -> Result<candle_core::Tensor> {
                let edits = BatchEdits::new(&spans)?;
                engine
                    .model
                    .forward(&ids, &counts, &mut caches, &edits, false)
            })
        };
        // Each row is read where the model wrote it (no copy of the
        // `[sequences, vocab]` logits, a fresh 12 MB a step at batch 64).
        let result = result.and_then(|logits| {
            with_rows(&logits, |all, _| {
                self.finish_step(state, events, all);
                Ok(())
            })
        });
        if let Err(error) = result {
            // Nothing of this pass is usable: end its sequences, keep serving.
            let message = error.to_string();
            for seq in state.running.drain(..) {
                state.reserved -= seq.request.bytes;
                events.push(Event {
                    id: seq.request.id,
                    token: None,
                    finish: Some(Finish::Error(message.clone())),
                    logits: None,
                    text: String::new(),
                });
            }
        }
    }

    /// Samples each running sequence's next token from its row of `all`
    /// (`[sequences, vocab]`), emits the events and retires what finished.
    fn finish_step(&self, state: &mut State, events: &mut Vec<Event>, all: &[f32]) {
        let engine = &self.engine;
        let eos = if state.running.iter().any(|s| !s.request.options.ignore_eos) {
            engine.eos_token_ids()
        } else {
            Vec::new()
        };
        let mut finished = Vec::new();
        let vocab = engine.config().vocab_size;
        for (index, (seq, values)) in state
            .running
            .iter_mut()
            .zip(all.chunks_exact(vocab))
            .enumerate()
        {
            let options = &seq.request.options;
            let token = sample::choose(values, &options.sampling, &mut seq.rng);
            let values = seq.request.return_logits.then(|| values.to_vec());
            if seq.next.is_none() && !engine.model.may_restart() {
                seq.request.prompt = Vec::new(); // prefilled: the cache holds it
            }
            seq.next = Some(token);
            let eos_token = !options.ignore_eos && eos.contains(&token);
            if !eos_token {
                seq.generated.push(token);
            }
            let mut finish = if eos_token {
                Some(Finish::Stop)
            } else if seq.generated.len() >= seq.request.max_new {
                Some(Finish::Length)
            } else {
                None
            };
            let mut piece = String::new();
            if let (Some(reply), Some(text)) = (seq.reply.as_mut(), engine.text()) {
                match reply.advance(text, &seq.generated, finish.is_some()) {
                    Ok(new) => piece = new,
                    Err(error) => finish = Some(Finish::Error(error.to_string())),
                }
                if reply.stopped() && !matches!(finish, Some(Finish::Error(_))) {
                    finish = Some(Finish::Stop);
                }
            }
            if finish.is_some() {
                finished.push(index);
            }
            events.push(Event {
                id: seq.request.id,
                token: (!eos_token).then_some(token),
                finish,
                logits: values,
                text: piece,
            });
        }
        for &index in finished.iter().rev() {
            let gone = state.running.remove(index);
            state.reserved -= gone.request.bytes;
        }
    }
}

/// Generation of a fixed set of prompts, advanced a token at a time by
/// [`Session::step`] (what [`Engine::generate`] runs).
pub struct Session {
    scheduler: Scheduler,
    ids: Vec<u64>,
    generated: Vec<Vec<u32>>,
    /// Each reply's text so far (empty without a tokenizer).
    texts: Vec<String>,
    done: Vec<bool>,
}

impl Session {
    /// Prepares `prompts`, each with its adapter (`adapters` empty: none).
    pub fn new(
        engine: Arc<Engine>,
        prompts: Vec<Vec<u32>>,
        adapters: Vec<Option<String>>,
        options: GenerateOptions,
    ) -> Result<Self> {
        if prompts.is_empty() {
            return Err(Error::InvalidArgument("no prompts given".into()));
        }
        if !adapters.is_empty() && adapters.len() != prompts.len() {
            return Err(Error::InvalidArgument(format!(
                "{} adapters given for {} prompts",
                adapters.len(),
                prompts.len()
            )));
        }
        if let Some(i) = prompts.iter().position(Vec::is_empty) {
            return Err(Error::InvalidArgument(format!("prompt {i} has no tokens")));
        }
        let n = prompts.len();
        let scheduler = Scheduler::new(
            engine,
            SchedulerOptions {
                max_batch: n,
                kv_cache_bytes: usize::MAX,
                max_prefill_tokens: usize::MAX,
                max_waiting: usize::MAX,
            },
        )?;
        let mut adapters = adapters.into_iter();
        let ids = prompts
            .into_iter()
            .enumerate()
            .map(|(i, prompt)| {
                scheduler
                    .submit(Request {
                        prompt,
                        adapter: adapters.next().flatten(),
                        options: options.clone(),
                        return_logits: false,
                        client: None,
                    })
                    .map_err(|e| match e {
                        Error::InvalidArgument(m) if n > 1 => {
                            Error::InvalidArgument(format!("prompt {i}: {m}"))
                        }
                        other => other,
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Session {
            scheduler,
            ids,
            generated: vec![Vec::new(); n],
            texts: vec![String::new(); n],
            done: vec![false; n],
        })
    }

    /// Tokens generated so far, per prompt.
    pub fn generated(&self) -> &[Vec<u32>] {
        &self.generated
    }

    /// The tokens generated, per prompt.
    pub fn into_generated(self) -> Vec<Vec<u32>> {
        self.generated
    }

    /// Each reply's text so far, cut before its first stop string; a
    /// finished reply's text is whole. Empty when the model has no tokenizer.
    pub fn texts(&self) -> &[String] {
        &self.texts
    }

    /// The replies' texts (see [`Session::texts`]).
    pub fn into_texts(self) -> Vec<String> {
        self.texts
    }

    /// Whether every prompt has finished.
    pub fn is_done(&self) -> bool {
        self.done.iter().all(|&d| d)
    }

    /// Generates one token for every unfinished prompt: `None` once all
    /// have finished, else the new token of each prompt (`None` for prompts
    /// that had already finished or that just hit an end-of-sequence token).
    pub fn step(&mut self) -> Result<Option<Vec<Option<u32>>>> {
        if self.is_done() {
            return Ok(None);
        }
        let mut out = vec![None; self.ids.len()];
        for event in self.scheduler.step()? {
            let row = (event.id - self.ids[0]) as usize;
            if let Some(token) = event.token {
                self.generated[row].push(token);
                out[row] = Some(token);
            }
            self.texts[row].push_str(&event.text);
            if let Some(finish) = event.finish {
                self.done[row] = true;
                if let Finish::Error(message) = finish {
                    return Err(Error::Backend(message));
                }
            }
        }
        Ok(Some(out))
    }
}
