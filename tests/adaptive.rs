//! Adaptive limit algorithms fed synthetic samples from a backend model.

use std::time::Duration;

use towerguard::limit::adaptive::{Aimd, Algorithm, Sample, Vegas};

const BASE: Duration = Duration::from_millis(10);

/// A small deterministic pseudo-random sequence in [0, 1).
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A backend with `capacity` concurrent slots: beyond it, requests queue and latency grows
/// in proportion; demand always fills the limit (sustained overload).
fn latency(in_flight: usize, capacity: usize, noise: &mut Noise) -> Duration {
    let queueing = (in_flight as f64 / capacity as f64).max(1.0);
    BASE.mul_f64(queueing * (0.95 + 0.1 * noise.next()))
}

/// Feeds `samples` samples the way the limiter does: averaged over the algorithm's window.
fn run(
    algorithm: &mut dyn Algorithm,
    samples: usize,
    mut sample: impl FnMut(usize) -> Sample,
) -> Vec<usize> {
    let window = algorithm.window();
    let mut limit = algorithm.initial_limit();
    let mut history = Vec::with_capacity(samples);
    let mut batch = Vec::with_capacity(window);
    for _ in 0..samples {
        batch.push(sample(limit));
        if batch.len() == window {
            let latency = batch.iter().map(|s| s.latency).sum::<Duration>() / window as u32;
            let in_flight = batch.iter().map(|s| s.in_flight).max().unwrap();
            let dropped = batch.iter().any(|s| s.dropped);
            let average = Sample::new(latency, in_flight, dropped);
            limit = algorithm.update(limit, average).max(1);
            batch.clear();
        }
        history.push(limit);
    }
    history
}

/// Vegas over the backend model of `capacity` slots under sustained overload, seeded.
fn vegas_over(vegas: &mut Vegas, capacity: usize, samples: usize, seed: u64) -> Vec<usize> {
    let mut noise = Noise(seed);
    run(vegas, samples, |limit| {
        Sample::new(latency(limit, capacity, &mut noise), limit, false)
    })
}

/// The values in ascending order, for reading percentiles.
fn sorted(values: &[usize]) -> Vec<usize> {
    let mut values = values.to_vec();
    values.sort_unstable();
    values
}

fn mean(values: &[usize]) -> f64 {
    values.iter().sum::<usize>() as f64 / values.len() as f64
}

#[test]
fn aimd_converges_below_a_capacity_signalled_by_drops_and_does_not_drift_up() {
    const CAPACITY: usize = 50;
    let mut aimd = Aimd::new(5, 1, 1_000);
    let mut noise = Noise(7);
    let history = run(&mut aimd, 40_000, |limit| {
        Sample::new(
            latency(limit, CAPACITY, &mut noise),
            limit,
            limit > CAPACITY,
        )
    });
    let late = &history[20_000..];
    let avg = mean(late);
    assert!(
        (0.85 * CAPACITY as f64..=CAPACITY as f64 + 1.0).contains(&avg),
        "mean {avg}"
    );
    assert!(
        late.iter().all(|&l| l <= CAPACITY + 1),
        "max {:?}",
        late.iter().max()
    );
    let (first, second) = history[10_000..].split_at(15_000);
    assert!(second.iter().max() <= first.iter().max(), "no upward drift");
}

#[test]
fn aimd_latency_threshold_counts_slow_samples_as_drops() {
    const CAPACITY: usize = 40;
    let mut aimd = Aimd::new(5, 1, 1_000).latency_threshold(BASE.mul_f64(1.5));
    let mut noise = Noise(3);
    let history = run(&mut aimd, 20_000, |limit| {
        Sample::new(latency(limit, CAPACITY, &mut noise), limit, false)
    });
    let late = &history[10_000..];
    assert!(
        late.iter().all(|&l| l <= (CAPACITY as f64 * 1.6) as usize),
        "max {:?}",
        late.iter().max()
    );
    assert!(mean(late) >= CAPACITY as f64 * 0.8, "mean {}", mean(late));
}

#[test]
fn vegas_converges_near_capacity_from_latency_alone() {
    for capacity in [20usize, 100, 400] {
        let mut vegas = Vegas::new(4, 1, 5_000);
        let history = vegas_over(&mut vegas, capacity, 60_000, capacity as u64);
        // The median: where the limit holds between the probes that halve it briefly.
        let late = &history[30_000..];
        let median = sorted(late)[late.len() / 2] as f64;
        let cap = capacity as f64;
        assert!(
            (cap * 0.95..=cap * 1.3).contains(&median),
            "capacity {capacity}: median {median}"
        );
        assert!(
            late.iter().all(|&l| (l as f64) <= cap * 1.4),
            "capacity {capacity}: max {:?}",
            late.iter().max()
        );
    }
}

#[test]
fn vegas_holds_a_small_backend_at_its_capacity_with_next_to_no_queue() {
    // Over 16 slots every request past the 16th waits a whole service time's share; the
    // estimate against the fastest request alone holds three to seven of them queued.
    const CAPACITY: usize = 16;
    let mut vegas = Vegas::new(16, 1, 1_000);
    let history = vegas_over(&mut vegas, CAPACITY, 60_000, 16);
    let late = sorted(&history[10_000..]);
    let (median, p95) = (late[late.len() / 2], late[late.len() * 19 / 20]);
    assert!((16..=17).contains(&median), "median {median}");
    assert!(p95 <= 17, "95th percentile {p95}");
    assert!(vegas.unqueued_latency().is_some());
}

#[test]
fn vegas_does_not_read_latency_spread_as_queue_down_to_its_minimum() {
    // A backend of 100 slots whose latency varies between 1 and 1.5 times its base, with
    // no queue: a window's fastest request is near the base and its mean a quarter above,
    // which Vegas reads as a queue of a fifth of the limit. Thresholds small enough to
    // act on that at a limit of 16 shrink the limit to its minimum while the backend has
    // room for six times as many requests.
    const CAPACITY: usize = 100;
    let mut vegas = Vegas::new(16, 4, 1_000);
    let history = vegas_over_spread(&mut vegas, CAPACITY, 0.5, 2_000, 9);
    let late = mean(&history[1_000..]);
    assert!(late >= 16.0, "mean {late}");
}

/// Vegas over a backend of `capacity` slots whose latency varies between 1 and
/// `1 + spread` times its base with no queue, and queues in proportion beyond capacity;
/// demand always fills the limit. Returns the limit after each window.
fn vegas_over_spread(
    vegas: &mut Vegas,
    capacity: usize,
    spread: f64,
    windows: usize,
    seed: u64,
) -> Vec<usize> {
    let window = Algorithm::window(vegas);
    let mut noise = Noise(seed);
    let mut limit = vegas.initial_limit();
    let mut history = Vec::with_capacity(windows);
    for _ in 0..windows {
        let queueing = (limit as f64 / capacity as f64).max(1.0);
        let latencies: Vec<Duration> = (0..window)
            .map(|_| BASE.mul_f64(queueing * (1.0 + spread * noise.next())))
            .collect();
        let mean = latencies.iter().sum::<Duration>() / window as u32;
        let fastest = *latencies.iter().min().unwrap();
        let sample = Sample::new(mean, limit, false).with_min_latency(fastest);
        limit = vegas.update(limit, sample).max(1);
        history.push(limit);
    }
    history
}

/// Runs Vegas from `initial` over 100 slots whose latency varies twofold (`seed`), and
/// checks that the limit settles at the capacity: over the second half of 6,000 windows,
/// median 85 to 110 and 95th percentile at most 115. Returns the Vegas.
fn assert_settles_at_capacity_of_a_twofold_spread(initial: usize, seed: u64) -> Vegas {
    const CAPACITY: usize = 100;
    let mut vegas = Vegas::new(initial, 4, 1_000);
    let history = vegas_over_spread(&mut vegas, CAPACITY, 1.0, 6_000, seed);
    let late = sorted(&history[3_000..]);
    let (median, p95) = (late[late.len() / 2], late[late.len() * 19 / 20]);
    assert!((85..=110).contains(&median), "seed {seed}: median {median}");
    assert!(p95 <= 115, "seed {seed}: 95th percentile {p95}");
    vegas
}

#[test]
fn vegas_reaches_the_capacity_of_a_backend_whose_latency_varies_twofold() {
    // 100 slots, latency between 1 and 2 times the base with no queue. Against the fastest
    // request alone this reads as a queue of a third of the limit and holds it near 12;
    // the probes at half and a quarter of the limit read the same latency, so the
    // latency at half is the backend's own and the limit follows the queue against it.
    for seed in [3, 4, 5] {
        let vegas = assert_settles_at_capacity_of_a_twofold_spread(16, seed);
        assert!(vegas.unqueued_is_flat(), "seed {seed}");
    }
}

#[test]
fn vegas_started_far_over_capacity_does_not_hold_the_probes_level() {
    // Started at 400 over 100 slots whose latency varies twofold: the first probe, at
    // 200, is itself over capacity and reads twice the base latency, as a threefold
    // spread would. The probe at a quarter (100) reads less, so that reading is not
    // taken as the backend's own and the limit comes down to the capacity.
    for seed in [6, 7, 8] {
        assert_settles_at_capacity_of_a_twofold_spread(400, seed);
    }
}

#[test]
fn vegas_does_not_drift_upward_under_sustained_overload() {
    const CAPACITY: usize = 100;
    let mut vegas = Vegas::new(10, 1, 10_000);
    let history = vegas_over(&mut vegas, CAPACITY, 200_000, 11);
    let windows: Vec<f64> = history[20_000..].chunks(20_000).map(mean).collect();
    let first = windows[0];
    for (i, w) in windows.iter().enumerate() {
        assert!(*w <= first * 1.05, "window {i}: mean {w} against {first}");
    }
}

#[test]
fn neither_algorithm_grows_while_less_than_half_the_limit_is_used() {
    let mut aimd = Aimd::new(20, 1, 1_000);
    let mut vegas = Vegas::new(20, 1, 1_000);
    let algorithms: [&mut dyn Algorithm; 2] = [&mut aimd, &mut vegas];
    for algorithm in algorithms {
        let history = run(algorithm, 5_000, |_| Sample::new(BASE, 3, false));
        assert!(history.iter().all(|&l| l == 20), "{history:?}");
    }
}

#[test]
fn limits_stay_within_their_bounds() {
    let mut aimd = Aimd::new(5, 3, 8);
    let history = run(&mut aimd, 1_000, |limit| Sample::new(BASE, limit, false));
    assert_eq!(*history.iter().max().unwrap(), 8);
    let history = run(&mut aimd, 1_000, |limit| Sample::new(BASE, limit, true));
    assert_eq!(*history.iter().min().unwrap(), 3);

    let mut vegas = Vegas::new(5, 3, 8);
    let history = run(&mut vegas, 1_000, |limit| Sample::new(BASE, limit, false));
    assert_eq!(*history.iter().max().unwrap(), 8);
    let history = run(&mut vegas, 1_000, |limit| Sample::new(BASE, limit, true));
    assert_eq!(*history.iter().min().unwrap(), 3);
}

#[test]
fn vegas_takes_its_baseline_from_the_fastest_request_when_it_starts_overloaded() {
    // Starting at 64 over a backend of 16 slots, every window's mean already includes
    // queueing; only the fastest request of a window shows the backend's own latency. With
    // the mean alone, Vegas would take the queueing for the baseline and stay far above 16.
    const CAPACITY: usize = 16;
    let mut vegas = Vegas::new(64, 1, 1_000);
    let mut limit = vegas.initial_limit();
    let mut noise = Noise(5);
    for _ in 0..300 {
        let mean = latency(limit, CAPACITY, &mut noise);
        let sample = Sample::new(mean, limit, false).with_min_latency(BASE);
        limit = vegas.update(limit, sample).max(1);
    }
    assert!(
        (CAPACITY..=CAPACITY * 3 / 2).contains(&limit),
        "the limit settled at {limit}"
    );
    // The model's latency without a queue goes down to 0.95 times the base.
    let no_load = vegas.no_load_latency().expect("a baseline");
    assert!(
        (BASE.mul_f64(0.95)..=BASE).contains(&no_load),
        "no-load latency {no_load:?}"
    );
}
