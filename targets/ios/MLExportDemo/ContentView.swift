import SwiftUI

@MainActor
final class Chat: ObservableObject {
    @Published var transcript = ""
    @Published var status = "Loading the model…"
    @Published var stats = ""
    @Published var busy = true
    private var generator: Generator?

    func load() async {
        do {
            let started = Date()
            let g = try await Generator()
            generator = g
            let seconds = Date().timeIntervalSince(started)
            status = "Ready: \(g.contract.quant ?? "?"), Core ML, loaded in \(String(format: "%.1f", seconds)) s"
            busy = false
        } catch {
            status = "Cannot load the model: \(error.localizedDescription)"
        }
    }

    func ask(_ user: String) {
        guard let g = generator, !user.isEmpty else { return }
        busy = true
        transcript += "\n\nYou: \(user)\nModel: "
        let prefix = transcript
        Task.detached(priority: .userInitiated) {
            do {
                let s = try g.generate(user) { text in Task { @MainActor in self.transcript = prefix + text } }
                let prefill = Double(s.promptTokens) / max(s.prefillSeconds, 1e-6)
                let decode = Double(max(s.generated - 1, 0)) / max(s.decodeSeconds, 1e-6)
                await MainActor.run {
                    self.stats = String(format: "prefill %.0f tok/s · decode %.1f tok/s · %d tokens", prefill, decode, s.generated)
                    self.busy = false
                }
            } catch {
                await MainActor.run { self.stats = error.localizedDescription; self.busy = false }
            }
        }
    }
}

struct ContentView: View {
    @StateObject private var chat = Chat()
    @State private var prompt = ""

    var body: some View {
        VStack(alignment: .leading, spacing: 8) {
            Text(chat.status).font(.caption)
            ScrollView { Text(chat.transcript).frame(maxWidth: .infinity, alignment: .leading).textSelection(.enabled) }
            Text(chat.stats).font(.caption2).foregroundStyle(.secondary)
            HStack {
                TextField("Ask something", text: $prompt, axis: .vertical).textFieldStyle(.roundedBorder)
                Button("Send") { chat.ask(prompt.trimmingCharacters(in: .whitespacesAndNewlines)); prompt = "" }
                    .disabled(chat.busy)
            }
        }
        .padding()
        .task { await chat.load() }
    }
}
