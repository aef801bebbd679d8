//! Runs one saved input through a harness on the stable toolchain, printing the structure it
//! reads as first: `cargo run --example run_one -- TARGET FILE`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [target, file] = args.as_slice() else {
        eprintln!("usage: run_one TARGET FILE");
        std::process::exit(2);
    };
    let bytes = std::fs::read(file).expect("reading the input");
    println!("{}", xenvirtio_fuzz::describe(target, &bytes));
    let start = std::time::Instant::now();
    xenvirtio_fuzz::run_bytes(target, &bytes);
    println!("ran clean in {:?}", start.elapsed());
}
