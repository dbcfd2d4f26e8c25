// qcowfs command line: subcommand dispatch, exit codes (0 ok, 1 runtime error,
// 2 usage error), one line on stderr per error.
#include <boost/program_options.hpp>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "config/config.h"
#include "config/control_protocol.h"
#include "config/mirror_job.h"
#include "daemon/control_server.h"
#include "daemon/daemon.h"
#include "qcow2/create.h"
#include "qcow2/image.h"
#include "util/size.h"
#include "version.h"

namespace po = boost::program_options;
using namespace qcowfs;

namespace {

constexpr const char* kVersion = "qcowfs " QCOWFS_VERSION;

struct UsageError {
  std::string msg;
};

void PrintMainHelp() {
  std::printf(
      "Usage: qcowfs COMMAND [OPTIONS]\n\n"
      "Commands:\n"
      "  create [--cluster-size N] [--backing FILE [--backing-format F]] IMAGE SIZE\n"
      "  info [--json] [-U] IMAGE\n"
      "  mount [OPTIONS] IMAGE MOUNTPOINT\n"
      "  mount --config FILE [OPTIONS]\n"
      "  IMAGE MOUNTPOINT [-o OPTS]          (same as mount; used by mount -t fuse.qcowfs)\n"
      "  status [--json] (MOUNTPOINT | --socket PATH)\n"
      "  mirror start    (MOUNTPOINT | --socket PATH) JOB.json [--wait]\n"
      "  mirror status   (MOUNTPOINT | --socket PATH) [JOB-ID] [--json]\n"
      "  mirror speed    (MOUNTPOINT | --socket PATH) JOB-ID BYTES-PER-SECOND\n"
      "  mirror complete (MOUNTPOINT | --socket PATH) JOB-ID [--no-pivot]\n"
      "  mirror cancel   (MOUNTPOINT | --socket PATH) JOB-ID\n\n"
      "Run 'qcowfs COMMAND --help' for the options of a command.\n");
}

// Parses args with the visible and hidden options; a parse error is a usage error.
po::variables_map Store(const std::vector<std::string>& args, const po::options_description& visible,
                        const po::options_description& hidden, const po::positional_options_description& pos) {
  po::options_description all;
  all.add(visible).add(hidden);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(args).options(all).positional(pos).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    throw UsageError{e.what()};
  }
  return vm;
}

// Parses argv (after the subcommand) with desc and positional names.
po::variables_map ParseArgs(const std::vector<std::string>& args, const po::options_description& desc,
                            const std::vector<std::string>& positional, bool* help) {
  po::options_description hidden;
  po::positional_options_description pos;
  for (const auto& p : positional) {
    hidden.add_options()(p.c_str(), po::value<std::string>(), "");
    pos.add(p.c_str(), 1);
  }
  po::variables_map vm = Store(args, desc, hidden, pos);
  *help = vm.count("help") > 0;
  if (!*help)
    for (const auto& p : positional)
      if (!vm.count(p)) throw UsageError{"missing argument " + p};
  return vm;
}

int CmdCreate(const std::vector<std::string>& args) {
  po::options_description desc("Usage: qcowfs create [OPTIONS] IMAGE SIZE\n\nCreates an empty qcow2 image (SIZE accepts K, M, G, T suffixes).\n\nOptions");
  desc.add_options()("help,h", "show this help")
      ("cluster-size", po::value<std::string>()->default_value("64K"), "cluster size, 512 to 2M")
      ("backing,b", po::value<std::string>(), "backing file (stored as given; relative to the image)")
      ("backing-format,F", po::value<std::string>(), "backing file format: qcow2 or raw")
      ("refcount-bits", po::value<unsigned>()->default_value(16), "refcount width: 1..64")
      ("compat", po::value<std::string>()->default_value("1.1"), "0.10 (version 2) or 1.1 (version 3)")
      ("lazy-refcounts", "enable lazy refcounts")
      ("extended-l2", "enable extended L2 entries (subclusters)");
  bool help = false;
  auto vm = ParseArgs(args, desc, {"IMAGE", "SIZE"}, &help);
  if (help) {
    std::cout << desc << "\n";
    return 0;
  }
  qcow2::CreateOptions o;
  auto size = ParseSize(vm["SIZE"].as<std::string>());
  if (!size.ok()) throw UsageError{size.status().message()};
  o.size = size.value();
  auto cs = ParseSize(vm["cluster-size"].as<std::string>());
  if (!cs.ok()) throw UsageError{"--cluster-size: " + cs.status().message()};
  uint64_t c = cs.value();
  if (c < 512 || c > (2u << 20) || (c & (c - 1)))
    throw UsageError{"--cluster-size must be a power of two from 512 to 2M"};
  o.cluster_bits = static_cast<uint32_t>(__builtin_ctzll(c));
  unsigned rb = vm["refcount-bits"].as<unsigned>();
  if (rb == 0 || rb > 64 || (rb & (rb - 1))) throw UsageError{"--refcount-bits must be 1, 2, 4, 8, 16, 32 or 64"};
  o.refcount_order = static_cast<uint32_t>(__builtin_ctz(rb));
  std::string compat = vm["compat"].as<std::string>();
  if (compat == "0.10") o.version = 2;
  else if (compat == "1.1") o.version = 3;
  else throw UsageError{"--compat must be 0.10 or 1.1"};
  o.lazy_refcounts = vm.count("lazy-refcounts") > 0;
  o.extended_l2 = vm.count("extended-l2") > 0;
  std::string image = vm["IMAGE"].as<std::string>();
  if (vm.count("backing")) {
    o.backing_file = vm["backing"].as<std::string>();
    if (vm.count("backing-format")) {
      o.backing_format = vm["backing-format"].as<std::string>();
      if (o.backing_format != "qcow2" && o.backing_format != "raw")
        throw UsageError{"--backing-format must be qcow2 or raw"};
    }
    // Check the backing file opens (relative to the new image's directory).
    std::string dir = image.rfind('/') == std::string::npos ? "." : image.substr(0, image.rfind('/'));
    std::string bpath = o.backing_file[0] == '/' ? o.backing_file : dir + "/" + o.backing_file;
    if (o.backing_format.empty()) {
      qcow2::OpenOptions ro;
      ro.read_only = true;
      ro.lock = false;
      o.backing_format = qcow2::Qcow2Image::Open(bpath, ro).ok() ? "qcow2" : "raw";
    }
    uint64_t bsize = 0;
    if (o.backing_format == "qcow2") {
      qcow2::OpenOptions ro;
      ro.read_only = true;
      ro.lock = false;
      auto b = qcow2::Qcow2Image::Open(bpath, ro);
      if (!b.ok()) {
        std::fprintf(stderr, "qcowfs: backing file %s\n", b.status().message().c_str());
        return 1;
      }
      bsize = b.value()->Size();
    } else {
      auto b = block::RawFileDevice::Open(bpath, true, block::LockMode::kNone);
      if (!b.ok()) {
        std::fprintf(stderr, "qcowfs: backing file %s\n", b.status().message().c_str());
        return 1;
      }
      bsize = b.value()->Size();
    }
    if (o.size == 0) o.size = bsize;  // SIZE 0: the backing file's size
  } else if (vm.count("backing-format")) {
    throw UsageError{"--backing-format needs --backing"};
  }
  Status s = qcow2::CreateFile(image, o);
  if (!s.ok()) {
    std::fprintf(stderr, "qcowfs: %s\n", s.message().c_str());
    return 1;
  }
  std::printf("Created %s: qcow2, %s, cluster size %llu%s%s\n", image.c_str(), FormatSize(o.size).c_str(),
              static_cast<unsigned long long>(c), o.backing_file.empty() ? "" : ", backing file ",
              o.backing_file.c_str());
  return 0;
}

int CmdInfo(const std::vector<std::string>& args) {
  po::options_description desc("Usage: qcowfs info [OPTIONS] IMAGE\n\nShows what a qcow2 image holds.\n\nOptions");
  desc.add_options()("help,h", "show this help")("json", "print JSON")
      ("force-share,U", "open without taking image locks (the image may be in use)");
  bool help = false;
  auto vm = ParseArgs(args, desc, {"IMAGE"}, &help);
  if (help) {
    std::cout << desc << "\n";
    return 0;
  }
  std::string path = vm["IMAGE"].as<std::string>();
  qcow2::OpenOptions o;
  o.read_only = true;
  o.lock = vm.count("force-share") == 0;
  auto r = qcow2::Qcow2Image::Open(path, o);
  if (!r.ok()) {
    std::fprintf(stderr, "qcowfs: %s\n", r.status().message().c_str());
    return 1;
  }
  auto& img = r.value();
  qcow2::Header h = img->header();
  const auto& g = img->geometry();
  std::vector<std::string> features;
  if (h.compatible & qcow2::kCompatLazyRefcounts) features.push_back("lazy_refcounts");
  if (g.extended_l2) features.push_back("extended_l2");
  if (h.incompatible & qcow2::kIncompatDataFile) features.push_back("data_file");
  if (h.autoclear & qcow2::kAutoclearDataFileRaw) features.push_back("data_file_raw");
  if (h.autoclear & qcow2::kAutoclearBitmaps) features.push_back("bitmaps");
  bool dirty = h.incompatible & qcow2::kIncompatDirty;
  bool corrupt = h.incompatible & qcow2::kIncompatCorrupt;
  std::string compression = h.compression_type == qcow2::kCompressionZstd ? "zstd" : "zlib";
  auto chain = img->BackingChain();
  if (vm.count("json")) {
    nlohmann::json j;
    j["filename"] = path;
    j["format"] = "qcow2";
    j["virtual-size"] = img->Size();
    j["actual-size"] = img->AllocatedBytes();
    j["cluster-size"] = g.cluster_size;
    j["version"] = h.version;
    j["compat"] = h.version == 2 ? "0.10" : "1.1";
    j["refcount-bits"] = g.refcount_bits;
    j["compression-type"] = compression;
    j["features"] = features;
    j["dirty"] = dirty;
    j["corrupt"] = corrupt;
    if (!h.backing_file.empty()) {
      j["backing-filename"] = h.backing_file;
      if (!h.backing_format.empty()) j["backing-filename-format"] = h.backing_format;
    }
    j["backing-chain"] = chain;
    if (!h.data_file.empty()) j["data-file"] = h.data_file;
    nlohmann::json snaps = nlohmann::json::array();
    for (const auto& s : img->snapshots())
      snaps.push_back({{"id", s.id}, {"name", s.name}, {"date-sec", s.date_sec},
                       {"vm-clock-nsec", s.vm_clock_ns}, {"vm-state-size", s.vm_state_size}});
    j["snapshots"] = snaps;
    std::cout << j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    return 0;
  }
  std::printf("image: %s\n", path.c_str());
  std::printf("file format: qcow2\n");
  std::printf("virtual size: %s (%llu bytes)\n", FormatSize(img->Size()).c_str(),
              static_cast<unsigned long long>(img->Size()));
  std::printf("allocated size: %s\n", FormatSize(img->AllocatedBytes()).c_str());
  std::printf("cluster size: %llu\n", static_cast<unsigned long long>(g.cluster_size));
  std::printf("version: %u (compat %s)\n", h.version, h.version == 2 ? "0.10" : "1.1");
  std::printf("refcount bits: %u\n", g.refcount_bits);
  std::printf("compression type: %s\n", compression.c_str());
  std::string f;
  for (const auto& x : features) f += (f.empty() ? "" : ", ") + x;
  std::printf("features: %s\n", f.empty() ? "none" : f.c_str());
  std::printf("state: %s%s\n", corrupt ? "corrupt" : "ok", dirty ? ", not cleanly shut down (dirty)" : "");
  if (!h.backing_file.empty())
    std::printf("backing file: %s%s%s\n", h.backing_file.c_str(), h.backing_format.empty() ? "" : " (format ",
                h.backing_format.empty() ? "" : (h.backing_format + ")").c_str());
  for (size_t i = 0; i < chain.size(); i++) std::printf("backing chain[%zu]: %s\n", i + 1, chain[i].c_str());
  if (!h.data_file.empty()) std::printf("data file: %s\n", h.data_file.c_str());
  if (!img->snapshots().empty()) {
    std::printf("snapshots:\n  %-6s %-20s %12s\n", "ID", "NAME", "VM STATE");
    for (const auto& s : img->snapshots())
      std::printf("  %-6s %-20s %12s\n", s.id.c_str(), s.name.c_str(), FormatSize(s.vm_state_size).c_str());
  }
  return 0;
}

int CmdMount(const std::vector<std::string>& args) {
  po::options_description desc(
      "Usage: qcowfs mount [OPTIONS] IMAGE MOUNTPOINT\n"
      "       qcowfs mount --config FILE [OPTIONS]\n\n"
      "Shows a qcow2 image as a raw file. A regular-file MOUNTPOINT becomes the image;\n"
      "a directory MOUNTPOINT shows STEM.raw. Returns once the mount is live.\n\nOptions");
  desc.add_options()("help,h", "show this help")
      ("config,c", po::value<std::string>(), "JSON config file (images, mountpoint, mirrors)")
      ("read-only,r", "mount read-only")
      ("allow-other", "let other users access the mount")
      ("threads,t", po::value<unsigned>(), "FUSE worker threads (default: number of CPUs)")
      ("poll-us", po::value<unsigned>(), "poll the FUSE device this many microseconds before a worker sleeps (default 50, 0: never)")
      ("transport", po::value<std::string>(), "FUSE transport: auto (default: io_uring where the kernel offers it), legacy (/dev/fuse), ring (io_uring or fail)")
      ("cache-size", po::value<std::string>(), "qcow2 metadata cache size (default 32M)")
      ("cache", po::value<std::string>(), "writeback (default): host page cache; none: O_DIRECT on the image, backing and data files")
      ("discard", po::value<std::string>(), "unmap (default): punch frees space; ignore: punch only zeroes")
      ("socket", po::value<std::string>(), "control socket path")
      ("options,o", po::value<std::vector<std::string>>()->composing(), "comma-separated options (ro, allow_other, threads=N, poll_us=N, transport=T, cache_size=S, cache=M, discard=M, socket=P)")
      ("foreground,f", "stay in the foreground, log to stderr")
      ("debug,d", "FUSE debug output (implies -f)");
  po::options_description hidden;
  hidden.add_options()("positional", po::value<std::vector<std::string>>(), "");
  po::positional_options_description pos;
  pos.add("positional", -1);
  po::variables_map vm = Store(args, desc, hidden, pos);
  if (vm.count("help")) {
    std::cout << desc << "\n";
    return 0;
  }
  std::vector<std::string> posv = vm.count("positional") ? vm["positional"].as<std::vector<std::string>>()
                                                         : std::vector<std::string>{};
  config::MountConfig cfg;
  if (vm.count("config")) {
    auto r = config::LoadMountConfig(vm["config"].as<std::string>());
    if (!r.ok()) {
      std::fprintf(stderr, "qcowfs: %s\n", r.status().message().c_str());
      return r.status().err() == ENOENT ? 1 : 2;
    }
    cfg = r.value();
    if (posv.size() == 1) cfg.mountpoint = posv[0];
    else if (!posv.empty()) throw UsageError{"with --config, give at most a MOUNTPOINT"};
    if (cfg.mountpoint.empty()) throw UsageError{"the config names no mountpoint"};
  } else {
    if (posv.size() != 2) throw UsageError{"expected IMAGE MOUNTPOINT"};
    config::ImageConfig ic;
    ic.path = posv[0];
    ic.name = config::DefaultExportName(ic.path);
    cfg.images.push_back(ic);
    cfg.mountpoint = posv[1];
  }
  // Command-line options override the file.
  if (vm.count("options"))
    for (const auto& o : vm["options"].as<std::vector<std::string>>())
      if (Status s = config::ApplyOptionList(o, &cfg); !s.ok()) throw UsageError{s.message()};
  if (vm.count("read-only")) for (auto& im : cfg.images) im.read_only = true;
  if (vm.count("allow-other")) cfg.allow_other = true;
  if (vm.count("threads")) {
    unsigned t = vm["threads"].as<unsigned>();
    if (t == 0 || t > 1024) throw UsageError{"--threads must be from 1 to 1024"};
    cfg.threads = t;
  }
  if (vm.count("poll-us")) {
    unsigned p = vm["poll-us"].as<unsigned>();
    if (p > config::kMaxPollUs) throw UsageError{"--poll-us must be from 0 to " + std::to_string(config::kMaxPollUs)};
    cfg.poll_us = p;
  }
  if (vm.count("transport")) {
    std::string t = vm["transport"].as<std::string>();
    if (!config::ValidTransport(t)) throw UsageError{"--transport must be auto, legacy or ring"};
    cfg.transport = t;
  }
  if (vm.count("cache-size")) {
    auto r = ParseSize(vm["cache-size"].as<std::string>());
    if (!r.ok()) throw UsageError{"--cache-size: " + r.status().message()};
    for (auto& im : cfg.images) im.cache_size = r.value();
  }
  if (vm.count("cache")) {
    auto r = config::ParseCacheMode(vm["cache"].as<std::string>(), "--cache");
    if (!r.ok()) throw UsageError{r.status().message()};
    for (auto& im : cfg.images) im.cache_none = r.value();
  }
  if (vm.count("discard")) {
    std::string d = vm["discard"].as<std::string>();
    if (d != "unmap" && d != "ignore") throw UsageError{"--discard must be unmap or ignore"};
    for (auto& im : cfg.images) im.discard_unmap = d == "unmap";
  }
  if (vm.count("socket")) cfg.socket = vm["socket"].as<std::string>();
  if (vm.count("foreground")) cfg.foreground = true;
  if (vm.count("debug")) cfg.debug = cfg.foreground = true;
  return daemon::RunMount(cfg);
}

// Finds the control socket for MOUNTPOINT or --socket.
std::string SocketFor(const po::variables_map& vm) {
  if (vm.count("socket")) return vm["socket"].as<std::string>();
  if (!vm.count("MOUNTPOINT")) throw UsageError{"give a MOUNTPOINT or --socket PATH"};
  char buf[PATH_MAX];
  std::string mp = vm["MOUNTPOINT"].as<std::string>();
  if (!realpath(mp.c_str(), buf)) throw UsageError{mp + ": no such mountpoint"};
  return config::DefaultSocketPath(buf);
}

int CmdStatus(const std::vector<std::string>& args) {
  po::options_description desc("Usage: qcowfs status [--json] (MOUNTPOINT | --socket PATH)\n\nShows a running mount.\n\nOptions");
  desc.add_options()("help,h", "show this help")("json", "print JSON")
      ("socket", po::value<std::string>(), "control socket path");
  po::options_description hidden;
  hidden.add_options()("MOUNTPOINT", po::value<std::string>(), "");
  po::positional_options_description pos;
  pos.add("MOUNTPOINT", 1);
  po::variables_map vm = Store(args, desc, hidden, pos);
  if (vm.count("help")) {
    std::cout << desc << "\n";
    return 0;
  }
  auto r = daemon::ControlCall(SocketFor(vm), "status");
  if (!r.ok()) {
    std::fprintf(stderr, "qcowfs: %s\n", r.status().message().c_str());
    return 1;
  }
  if (vm.count("json")) {
    std::cout << nlohmann::json::parse(r.value()).dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    return 0;
  }
  auto st = config::StatusFromJson(r.value());
  if (!st.ok()) {
    std::fprintf(stderr, "qcowfs: %s\n", st.status().message().c_str());
    return 1;
  }
  std::cout << config::StatusToText(st.value());
  return 0;
}

std::string SocketForMountpoint(const std::string& mp) {
  char buf[PATH_MAX];
  if (!realpath(mp.c_str(), buf)) throw UsageError{mp + ": no such mountpoint"};
  return config::DefaultSocketPath(buf);
}

// Prints the daemon's error (one line) and returns 1, or the result.
std::optional<std::string> Call(const std::string& sock, const std::string& cmd, const nlohmann::json& args) {
  auto r = daemon::ControlCall(sock, cmd, args.dump());
  if (!r.ok()) {
    std::fprintf(stderr, "qcowfs: %s\n", r.status().message().c_str());
    return std::nullopt;
  }
  return r.value();
}

// `mirror start --wait`: a progress bar on a terminal, plain lines otherwise; 0 once the
// job is ready, 1 if it failed or was cancelled.
int WaitReady(const std::string& sock, const std::string& id) {
  bool tty = isatty(STDOUT_FILENO);
  std::string last;
  auto next_line = std::chrono::steady_clock::now();
  for (;;) {
    auto r = Call(sock, "mirror-status", {{"id", id}});
    if (!r) return 1;
    auto m = config::MirrorReportFromJson(*r);
    if (!m.ok()) {
      std::fprintf(stderr, "qcowfs: %s\n", m.status().message().c_str());
      return 1;
    }
    const config::MirrorReport& rep = m.value();
    std::string line = config::MirrorReportToText(rep);
    if (tty) {
      uint64_t pct = rep.bytes_total ? std::min<uint64_t>(100, rep.bytes_done * 100 / rep.bytes_total) : (rep.state == "running" ? 0 : 100);
      std::string bar(pct * 30 / 100, '#');
      bar.resize(30, '.');
      std::printf("\r[%s] %s\033[K", bar.c_str(), line.c_str());
      std::fflush(stdout);
    } else if (line != last && std::chrono::steady_clock::now() >= next_line) {
      std::printf("%s\n", line.c_str());
      std::fflush(stdout);
      last = line;
      next_line = std::chrono::steady_clock::now() + std::chrono::seconds(1);
    }
    if (rep.state != "running") {
      if (tty) std::printf("\n");
      else if (line != last) std::printf("%s\n", line.c_str());
      if (rep.state == "ready" || rep.state == "completed") return 0;
      std::fprintf(stderr, "qcowfs: mirror job %s %s%s%s\n", id.c_str(), rep.state.c_str(),
                   rep.error.empty() ? "" : ": ", rep.error.c_str());
      return 1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

int CmdMirror(const std::vector<std::string>& args) {
  const char* usage =
      "Usage: qcowfs mirror start    (MOUNTPOINT | --socket PATH) JOB.json [--wait]\n"
      "       qcowfs mirror status   (MOUNTPOINT | --socket PATH) [JOB-ID] [--json]\n"
      "       qcowfs mirror speed    (MOUNTPOINT | --socket PATH) JOB-ID BYTES-PER-SECOND\n"
      "       qcowfs mirror complete (MOUNTPOINT | --socket PATH) JOB-ID [--no-pivot]\n"
      "       qcowfs mirror cancel   (MOUNTPOINT | --socket PATH) JOB-ID\n\n"
      "Copies a mounted image live to a file or an NBD server (see README).\n\nOptions";
  po::options_description desc(usage);
  desc.add_options()("help,h", "show this help")("socket", po::value<std::string>(), "control socket path")
      ("wait", "start: wait until the job is ready, with a progress bar")("json", "status: print JSON")
      ("no-pivot", "complete: leave the target an exact copy instead of switching the mount to it");
  po::options_description hidden;
  hidden.add_options()("positional", po::value<std::vector<std::string>>(), "");
  po::positional_options_description pos;
  pos.add("positional", -1);
  po::variables_map vm = Store(args, desc, hidden, pos);
  std::vector<std::string> p = vm.count("positional") ? vm["positional"].as<std::vector<std::string>>()
                                                      : std::vector<std::string>{};
  if (vm.count("help") || p.empty()) {
    std::cout << desc << "\n";
    return vm.count("help") ? 0 : 2;
  }
  std::string sub = p[0];
  p.erase(p.begin());
  std::string sock;
  if (vm.count("socket")) {
    sock = vm["socket"].as<std::string>();
  } else {
    if (p.empty()) throw UsageError{"give a MOUNTPOINT or --socket PATH"};
    sock = SocketForMountpoint(p[0]);
    p.erase(p.begin());
  }
  auto want = [&](size_t lo, size_t hi) {
    if (p.size() < lo || p.size() > hi) throw UsageError{"wrong number of arguments for 'mirror " + sub + "'"};
  };
  if (sub == "start") {
    want(1, 1);
    std::ifstream in(p[0]);
    if (!in) {
      std::fprintf(stderr, "qcowfs: %s: cannot read the job file\n", p[0].c_str());
      return 1;
    }
    std::stringstream ss;
    ss << in.rdbuf();
    auto job = config::ParseMirrorJob(ss.str(), p[0]);
    if (!job.ok()) {
      std::fprintf(stderr, "qcowfs: %s\n", job.status().message().c_str());
      return 1;
    }
    auto r = Call(sock, "mirror-start", nlohmann::json::parse(config::MirrorJobToJson(job.value())));
    if (!r) return 1;
    auto m = config::MirrorReportFromJson(*r);
    std::string id = m.ok() ? m.value().id : "";
    std::printf("mirror job %s started\n", id.c_str());
    std::fflush(stdout);
    return vm.count("wait") ? WaitReady(sock, id) : 0;
  }
  if (sub == "status") {
    want(0, 1);
    nlohmann::json a = nlohmann::json::object();
    if (!p.empty()) a["id"] = p[0];
    auto r = Call(sock, "mirror-status", a);
    if (!r) return 1;
    nlohmann::json j = nlohmann::json::parse(*r);
    if (vm.count("json")) {
      std::cout << j.dump(2) << "\n";
      return 0;
    }
    nlohmann::json list = p.empty() ? j["jobs"] : nlohmann::json::array({j});
    if (list.empty()) std::printf("no mirror jobs\n");
    for (const auto& x : list) {
      auto m = config::MirrorReportFromJson(x.dump());
      if (m.ok()) std::printf("%s: %s\n", m.value().image.c_str(), config::MirrorReportToText(m.value()).c_str());
    }
    return 0;
  }
  if (sub == "speed") {
    want(2, 2);
    auto bps = ParseSize(p[1]);
    if (!bps.ok()) throw UsageError{"BYTES-PER-SECOND: " + bps.status().message()};
    return Call(sock, "mirror-set-speed", {{"id", p[0]}, {"speed", bps.value()}}) ? 0 : 1;
  }
  if (sub == "complete") {
    want(1, 1);
    auto r = Call(sock, "mirror-complete", {{"id", p[0]}, {"pivot", vm.count("no-pivot") == 0}});
    if (!r) return 1;
    std::printf("mirror job %s completed%s\n", p[0].c_str(),
                vm.count("no-pivot") ? "; the target is an exact copy" : "; the mount now serves the target");
    return 0;
  }
  if (sub == "cancel") {
    want(1, 1);
    return Call(sock, "mirror-cancel", {{"id", p[0]}}) ? 0 : 1;
  }
  throw UsageError{"unknown mirror command '" + sub + "'"};
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) {
    PrintMainHelp();
    return 2;
  }
  std::string cmd = args[0];
  std::vector<std::string> rest(args.begin() + 1, args.end());
  try {
    if (cmd == "--help" || cmd == "-h" || cmd == "help") {
      PrintMainHelp();
      return 0;
    }
    if (cmd == "--version" || cmd == "-V") {
      std::printf("%s\n", kVersion);
      return 0;
    }
    if (cmd == "create") return CmdCreate(rest);
    if (cmd == "info") return CmdInfo(rest);
    if (cmd == "mount") return CmdMount(rest);
    if (cmd == "status") return CmdStatus(rest);
    if (cmd == "mirror") return CmdMirror(rest);
    // `qcowfs IMAGE MOUNTPOINT [-o OPTS]`, as mount.fuse3 runs it.
    if (!cmd.empty() && cmd[0] != '-' && args.size() >= 2) return CmdMount(args);
    throw UsageError{"unknown command '" + cmd + "' (try qcowfs --help)"};
  } catch (const UsageError& e) {
    std::fprintf(stderr, "qcowfs %s: %s\n", cmd.c_str(), e.msg.c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qcowfs %s: %s\n", cmd.c_str(), e.what());
    return 1;
  }
}
