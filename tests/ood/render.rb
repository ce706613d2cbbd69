# Renders the app's ERB files the way the Open OnDemand dashboard does, for the Python tests.
#
#   ruby tests/ood/render.rb < requests.json > results.json
#
# Input: a JSON list of {"kind": "form"|"submit"|"template"|"view", "path": FILE, "context": {...}, "env": {...}}.
# Output: a JSON list, one {"result": ...} or {"error": "Class: message"} per request, in order.
#   form:     ERB.new(src, trim_mode: '-'), filename set, result without a binding, then YAML.safe_load
#             (BatchConnect::App#form_config / read_yaml_erb)
#   submit:   the same, with the form's values (Strings) as methods of an OpenStruct binding
#             (BatchConnect::App#submit_opts); `staged_root` is added as the dashboard adds it
#   template: ERB.new(src, trim_mode: '-') without a filename, bound to Struct(:session, :context)
#             (BatchConnect::Session#stage / render_erb_files)
#   view:     ERB.new(src, trim_mode: '-') bound to the OpenStruct of connection.yml
#             (batch_connect/sessions/connections/_custom.html.erb)
require "erb"
require "json"
require "ostruct"
require "yaml"

TemplateBinding = Struct.new(:session, :context) do
  def get_binding
    binding
  end
end

def with_env(env)
  saved = ENV.to_h
  env.each { |key, value| value.nil? ? ENV.delete(key) : ENV[key] = value }
  yield
ensure
  ENV.replace(saved)
end

def render(request)
  path = request.fetch("path")
  src = File.read(path)
  context = request.fetch("context", {})
  case request.fetch("kind")
  when "form"
    erb = ERB.new(src, trim_mode: "-")
    erb.filename = path
    YAML.safe_load(erb.result(nil)).to_h
  when "submit"
    struct = OpenStruct.new(context.merge("staged_root" => request["staged_root"]))
    erb = ERB.new(src, trim_mode: "-")
    erb.filename = path
    YAML.safe_load(erb.result(struct.instance_eval { binding })).to_h
  when "template"
    session = OpenStruct.new(staged_root: request["staged_root"])
    ERB.new(src, trim_mode: "-").result(TemplateBinding.new(session, OpenStruct.new(context)).get_binding)
  when "view"
    connect = OpenStruct.new(YAML.safe_load(File.read(request.fetch("connection"))))
    ERB.new(src, trim_mode: "-").result(connect.instance_eval { binding })
  else
    raise ArgumentError, "unknown kind #{request['kind'].inspect}"
  end
end

results = JSON.parse($stdin.read).map do |request|
  with_env(request.fetch("env", {})) { { "result" => render(request) } }
rescue StandardError, ScriptError => e
  { "error" => "#{e.class}: #{e.message}" }
end
puts JSON.generate(results)
