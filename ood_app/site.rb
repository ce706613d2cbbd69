# The site's settings and resource tiers for form.yml.erb and submit.yml.erb: the same site config and
# resource_specs.yaml the portal reads (portal/config.py, portal/catalog/tiers.py), by the same rules, and
# for each tier the same sbatch options the portal's own code gives it (portal/scheduler/slurm.py).
#
# Where the site config is: $PILOTFISH_SITE_CONFIG, else /etc/pilotfish/site.yml if it exists.
# The tiers: the site config's `resource_specs` (must exist), else `cache_dir`/resource_specs.yaml (if it
# exists), else portal/catalog/default_resource_specs.yaml; PILOTFISH_RESOURCE_SPECS and PILOTFISH_CACHE_DIR
# override the file's keys, as they do for the portal.
require "json"
require "yaml"

# The dashboard `load`s this file at each render (a long-running process sees an updated app at once):
# start from a fresh module so its constants are not redefined.
Object.send(:remove_const, :PilotfishSite) if Object.const_defined?(:PilotfishSite)

module PilotfishSite
  class Error < StandardError; end

  DEFAULT_SITE_CONFIG = "/etc/pilotfish/site.yml"
  SPECS_FILE = "resource_specs.yaml"
  MAX_SPECS_BYTES = 1024 * 1024
  PLACEMENTS = {
    "separate_jobs" => "Portal on a light CPU job, services as separate jobs",
    "this_allocation" => "Services inside this allocation",
  }.freeze
  # The portal job of "separate_jobs": the portal only submits and proxies, its services get their own jobs.
  # The site config's `portal_job` (partition, cpus, memory_gb) changes it; the default partition otherwise.
  LIGHT_JOB = { cpus: 1, memory_gb: 2 }.freeze
  # The form's choices for the session's default idle timeout (minutes; "": the site's and the tiers' defaults; "0":
  # never). The portal applies it to launches that do not set their own (PILOTFISH_IDLE_TIMEOUT, portal/lifetimes.py).
  IDLE_CHOICES = [["15 minutes", "15"], ["30 minutes", "30"], ["1 hour", "60"], ["2 hours", "120"],
                  ["4 hours", "240"], ["Never", "0"]].freeze
  PORTAL_JOB_FIELDS = %w[partition cpus memory_gb].freeze

  # idle_timeout: the tier's default idle timeout, which the portal checks and applies (the form does not use it).
  TIER_FIELDS = %w[name description max_model_size_gb gpu_count gpu_type cpu_cores memory_gb slurm idle_timeout].freeze
  REQUIRED_TIER_FIELDS = %w[name description max_model_size_gb gpu_count cpu_cores memory_gb].freeze
  SLURM_FIELDS = %w[constraint gres].freeze
  PARTITION_NAME = /\A[A-Za-z0-9_\-]{1,64}\z/.freeze
  SLURM_VALUE = /\A[^[:space:]\x00-\x08\x0e-\x1f\x7f]{1,200}\z/.freeze  # Python: [^\s\x00-\x1f\x7f]
  TEXT = /\A[^\x00-\x1f\x7f]{1,200}\z/.freeze
  DESCRIPTION = /\A[^\x00-\x1f\x7f]{0,500}\z/.freeze

  Tier = Struct.new(:partition, :name, :description, :max_model_size_gb, :gpu_count, :gpu_type, :cpu_cores,
                    :memory_gb, :slurm, keyword_init: true) do
    def ref
      "#{partition}.#{name}"
    end

    def label
      gpus = if gpu_count.zero? then "no GPU"
             else "#{gpu_count} GPU#{'s' if gpu_count > 1}#{" (#{gpu_type})" if gpu_type}"
             end
      "#{name}: #{description} · #{gpus}, #{cpu_cores} CPU cores, #{PilotfishSite.number(memory_gb)} GB memory " \
        "· partition #{partition}"
    end
  end

  Specs = Struct.new(:source, :time_default, :time_max, :partitions, :default_partition, keyword_init: true) do
    # Every tier, default partition first, each partition in file order (portal: tiers.all_tiers).
    def tiers
      order = [default_partition] + (partitions.keys - [default_partition])
      order.flat_map { |name| partitions[name] }
    end

    # The tier a form posted: exactly one of the select's values, anything else is refused.
    def tier!(ref)
      found = tiers.find { |tier| tier.ref == ref }
      return found if found

      raise Error, "unknown resource tier #{ref.to_s.inspect} (available: #{tiers.map(&:ref).join(', ')})"
    end

    # Minutes from the form's hours; above time.max is refused, never clamped (portal: tiers.check_time).
    def minutes!(hours)
      text = hours.to_s.strip
      raise Error, "hours: expected a number such as 1 or 1.5, got #{hours.to_s.inspect}" unless text.match?(/\A\d{1,4}(\.\d{1,4})?\z/)

      minutes = (text.to_r * 60).ceil
      raise Error, "hours: must be more than 0" if minutes < 1
      if minutes > time_max
        raise Error, "hours: #{text} hours (#{minutes} minutes) exceeds the site maximum of #{time_max} minutes " \
                     "(time.max in #{source || 'the default tiers'})"
      end
      minutes
    end

    # The most hours the form offers, in quarter hours (the form's step) within time.max.
    def max_hours
      [(time_max / 15) / 4.0, 0.25].max
    end
  end

  module_function

  # "16" for 16.0, "0.25" for 0.25: numbers as a person writes them.
  def number(value)
    value.to_f == value.to_i ? value.to_i.to_s : value.to_s
  end

  def site_config_path(env = ENV)
    given = env["PILOTFISH_SITE_CONFIG"].to_s
    return File.expand_path(given) unless given.empty?

    File.file?(DEFAULT_SITE_CONFIG) ? DEFAULT_SITE_CONFIG : nil
  end

  def read_site_config(path)
    return {} if path.nil?

    text = begin
      File.read(path)
    rescue Errno::ENOENT
      raise Error, "site config #{path}: file not found (set by PILOTFISH_SITE_CONFIG)"
    rescue SystemCallError => e
      raise Error, "site config #{path}: cannot read: #{e.message}"
    end
    data = begin
      YAML.safe_load(text, aliases: true) || {}
    rescue Psych::Exception => e
      raise Error, "site config #{path}: not valid YAML: #{e.message}"
    end
    raise Error, "site config #{path}: expected a mapping at the top level" unless data.is_a?(Hash)

    data
  end

  # The resource_specs.yaml the portal would read, or nil for the default tiers.
  def specs_path(site, env = ENV)
    pick = lambda do |key, env_name|
      value = env[env_name].to_s
      value.empty? ? site[key] : value
    end
    explicit = pick.call("resource_specs", "PILOTFISH_RESOURCE_SPECS")
    return [File.expand_path(explicit.to_s), true] if explicit && !explicit.to_s.empty?

    cache_dir = pick.call("cache_dir", "PILOTFISH_CACHE_DIR")
    return [nil, false] if cache_dir.nil? || cache_dir.to_s.empty?

    [File.join(File.expand_path(cache_dir.to_s), SPECS_FILE), false]
  end

  def default_specs_file
    File.expand_path("../portal/catalog/default_resource_specs.yaml", __dir__)
  end

  # [site config path or nil, Specs, the site config's settings] for this site.
  def load(env = ENV)
    config_path = site_config_path(env)
    settings = read_site_config(config_path)
    path, required = specs_path(settings, env)
    specs = if path && File.exist?(path) then load_specs(path, path)
            elsif path && required then raise Error, "#{path}: file not found"
            else load_specs(default_specs_file, nil)
            end
    [config_path, specs, settings]
  end

  def load_specs(path, source)
    text = begin
      File.read(path, encoding: "UTF-8")
    rescue SystemCallError => e
      raise Error, "#{path}: cannot read: #{e.message}"
    end
    raise Error, "#{path}: larger than #{MAX_SPECS_BYTES / 1024} KB: not a resource specs file" if text.bytesize > MAX_SPECS_BYTES
    raise Error, "#{path}: not UTF-8 text" unless text.valid_encoding?

    data = begin
      YAML.safe_load(text, aliases: true)  # PyYAML, which the portal uses, accepts anchors too
    rescue Psych::SyntaxError => e
      raise Error, "#{path}: not valid YAML: line #{e.line}, column #{e.column}: #{e.problem}"
    rescue Psych::Exception => e
      raise Error, "#{path}: not valid YAML: #{e.message}"
    end
    parse_specs(data, path, source)
  end

  # --- checking the file (the portal's rules, portal/catalog/tiers.py) --------------------------------

  def show(value)
    case value
    when true then "true"
    when false then "false"
    when nil then "null"
    when String then value.to_json
    when Integer, Float then value.to_s
    when Hash then "a mapping"
    when Array then "a list"
    else "a #{value.class.name.downcase}"
    end
  end

  def fail!(file, path, problem)
    raise Error, path.empty? ? "#{file}: #{problem}" : "#{file}: #{path}: #{problem}"
  end

  def mapping(file, path, value, allowed = nil, required = [])
    fail!(file, path, "expected a mapping, got #{show(value)}") unless value.is_a?(Hash)
    value.each_key do |key|
      next if allowed.nil? || allowed.include?(key)

      fail!(file, path.empty? ? key.to_s : "#{path}.#{key}", "unknown field (expected one of: #{allowed.join(', ')})")
    end
    required.each { |key| fail!(file, path, "missing required field `#{key}`") unless value.key?(key) }
    value
  end

  def integer(file, path, value, minimum)
    fail!(file, path, "expected an integer, got #{show(value)}") unless value.is_a?(Integer)
    fail!(file, path, "must be at least #{minimum}, got #{value}") if value < minimum
    value
  end

  def real(file, path, value, positive: false)
    unless value.is_a?(Integer) || (value.is_a?(Float) && value.finite?)
      fail!(file, path, "expected a number, got #{show(value)}")
    end
    if value.negative? || (positive && value.zero?)
      fail!(file, path, "must be #{positive ? 'greater than 0' : 'at least 0'}, got #{value}")
    end
    value
  end

  def text(file, path, value, pattern = TEXT, what = "a single line of text")
    fail!(file, path, "expected #{what}, got #{show(value)}") unless value.is_a?(String) && value.match?(pattern)
    value
  end

  def parse_tier(file, path, partition, raw)
    raw = mapping(file, path, raw, TIER_FIELDS, REQUIRED_TIER_FIELDS)
    slurm = mapping(file, "#{path}.slurm", raw["slurm"] || {}, SLURM_FIELDS)
    name = text(file, "#{path}.name", raw["name"]).strip
    fail!(file, "#{path}.name", "must not be blank") if name.empty?
    size = raw["max_model_size_gb"]
    gpu_type = raw["gpu_type"]
    Tier.new(
      partition: partition, name: name,
      description: text(file, "#{path}.description", raw["description"], DESCRIPTION),
      max_model_size_gb: size.nil? ? nil : real(file, "#{path}.max_model_size_gb", size),
      gpu_count: integer(file, "#{path}.gpu_count", raw["gpu_count"], 0),
      gpu_type: gpu_type.nil? ? nil : text(file, "#{path}.gpu_type", gpu_type, SLURM_VALUE, "a Slurm GPU type"),
      cpu_cores: integer(file, "#{path}.cpu_cores", raw["cpu_cores"], 1),
      memory_gb: real(file, "#{path}.memory_gb", raw["memory_gb"], positive: true),
      slurm: slurm.reject { |_, value| value.nil? }.to_h { |key, value|
        [key, text(file, "#{path}.slurm.#{key}", value, SLURM_VALUE, "a Slurm value without spaces")]
      }
    )
  end

  def parse_specs(data, file, source)
    fail!(file, "", "the file is empty (expected a mapping with `partitions`)") if data.nil?
    top = mapping(file, "", data, %w[time partitions models], %w[partitions])
    time = mapping(file, "time", top["time"] || {}, %w[default max])
    time_default = integer(file, "time.default", time.fetch("default", 30), 1)
    time_max = integer(file, "time.max", time.fetch("max", 180), 1)
    if time_default > time_max
      fail!(file, "time.default", "#{time_default} minutes is more than time.max (#{time_max} minutes)")
    end
    raw_partitions = mapping(file, "partitions", top["partitions"])
    fail!(file, "partitions", "no partition defined") if raw_partitions.empty?

    partitions = {}
    defaults = []
    raw_partitions.each do |name, raw|
      path = "partitions.#{name}"
      text(file, path, name, PARTITION_NAME, "a partition name of letters, digits, '_' or '-' (the key)")
      raw = mapping(file, path, raw, %w[default tiers], %w[tiers])
      is_default = raw.fetch("default", false)
      fail!(file, "#{path}.default", "expected true or false, got #{show(is_default)}") unless [true, false].include?(is_default)
      defaults << name if is_default
      unless raw["tiers"].is_a?(Array) && !raw["tiers"].empty?
        fail!(file, "#{path}.tiers", "expected a non-empty list of tiers, got #{show(raw['tiers'])}")
      end
      tiers = []
      raw["tiers"].each_with_index do |raw_tier, index|
        tier = parse_tier(file, "#{path}.tiers[#{index}]", name, raw_tier)
        other = tiers.index { |seen| seen.name.downcase == tier.name.downcase }
        unless other.nil?
          fail!(file, "#{path}.tiers[#{index}].name", "duplicate tier name #{show(tier.name)} (also tiers[#{other}])")
        end
        tiers << tier
      end
      partitions[name] = tiers
    end
    fail!(file, "partitions", "#{defaults.join(' and ')} both have `default: true`; mark exactly one") if defaults.size > 1
    if defaults.empty?
      fail!(file, "partitions", "no partition has `default: true`; mark exactly one") if partitions.size > 1
      defaults = partitions.keys
    end
    Specs.new(source: source, time_default: time_default, time_max: time_max, partitions: partitions,
              default_partition: defaults.first)
  end

  # --- what a job asks of Slurm --------------------------------------------------------------------------

  # The sbatch options of a job with these resources, in the portal's order (portal/scheduler/sbatch.py).
  def sbatch_options(minutes:, partition: nil, cpus: nil, memory_gb: nil, gpus: 0, gpu_type: nil, gres: nil,
                     constraint: nil)
    args = ["--time=#{minutes}"]
    args << "--partition=#{partition}" if partition
    args << "--cpus-per-task=#{cpus}" if cpus && cpus.positive?
    # Python's round() rounds halves to even: the same megabytes as the portal.
    args << "--mem=#{(memory_gb.to_f * 1024).round(half: :even)}M" if memory_gb && memory_gb.positive?
    if gres
      args << "--gres=#{gres}"
    elsif gpus.positive?
      args << "--gres=#{gpu_type ? "gpu:#{gpu_type}:#{gpus}" : "gpu:#{gpus}"}"
    end
    args << "--constraint=#{constraint}" if constraint
    args
  end

  # A tier's job (portal: tiers.sbatch_options(tiers.tier_resources(tier, minutes))).
  def tier_options(tier, minutes)
    sbatch_options(minutes: minutes, partition: tier.partition, cpus: tier.cpu_cores, memory_gb: tier.memory_gb,
                   gpus: tier.gpu_count, gpu_type: tier.gpu_type, gres: tier.slurm["gres"],
                   constraint: tier.slurm["constraint"])
  end

  # The light portal job: LIGHT_JOB with the site config's `portal_job` settings, each checked.
  def light_job(settings)
    given = settings.fetch("portal_job", nil)
    return LIGHT_JOB if given.nil?
    raise Error, "portal_job: expected a mapping such as {partition: interactive, cpus: 1, memory_gb: 2}" unless given.is_a?(Hash)

    unknown = given.keys.map(&:to_s) - PORTAL_JOB_FIELDS
    raise Error, "portal_job.#{unknown.first}: unknown setting (known: #{PORTAL_JOB_FIELDS.join(', ')})" unless unknown.empty?

    job = LIGHT_JOB.dup
    if given.key?("partition")
      value = given["partition"]
      unless value.is_a?(String) && value.match?(PARTITION_NAME)
        raise Error, "portal_job.partition: expected a partition name (letters, digits, _ and -), got #{value.inspect}"
      end
      job[:partition] = value
    end
    if given.key?("cpus")
      value = given["cpus"]
      raise Error, "portal_job.cpus: expected a whole number from 1 to 256, got #{value.inspect}" unless value.is_a?(Integer) && value.between?(1, 256)
      job[:cpus] = value
    end
    if given.key?("memory_gb")
      value = given["memory_gb"]
      unless value.is_a?(Numeric) && !value.is_a?(Complex) && value.positive? && value <= 4096
        raise Error, "portal_job.memory_gb: expected a number of GB above 0 and up to 4096, got #{value.inspect}"
      end
      job[:memory_gb] = value
    end
    job
  end

  # "1 CPU and 2 GB on the default partition": the light job in words, for the form.
  def light_job_text(job)
    where = job[:partition] ? "partition #{job[:partition]}" : "the default partition"
    "#{job[:cpus]} CPU#{'s' if job[:cpus] > 1} and #{number(job[:memory_gb])} GB on #{where}"
  end

  # The form's idle timeout choices, the site's default first ("": what the site config and the tiers say).
  def idle_choices(settings)
    default = settings["idle_timeout"]
    words = if default.nil? || default.to_s.empty? then "never, unless the tier says otherwise"
            elsif default.is_a?(Integer) then "#{default} minutes"
            else default.to_s
            end
    [["The site's default: #{words}", ""]] + IDLE_CHOICES
  end

  # The idle timeout a form posted: one of the choices it offered, anything else is refused.
  def idle_timeout!(value)
    return value.to_s if ([""] + IDLE_CHOICES.map(&:last)).include?(value.to_s)

    raise Error, "unknown choice #{value.to_s.inspect} for the idle timeout (expected one of: " \
                 "#{IDLE_CHOICES.map(&:last).join(', ')}, or empty for the site's default)"
  end

  # The portal job's sbatch options for a form's choices; anything not offered by the form is refused.
  def portal_job_options(specs, placement:, tier:, hours:, settings: {})
    chosen = specs.tier!(tier)
    minutes = specs.minutes!(hours)
    case placement
    when "this_allocation" then tier_options(chosen, minutes)
    when "separate_jobs" then sbatch_options(minutes: minutes, **light_job(settings))
    else raise Error, "unknown choice #{placement.to_s.inspect} for where services run " \
                      "(expected one of: #{PLACEMENTS.keys.join(', ')})"
    end
  end
end
