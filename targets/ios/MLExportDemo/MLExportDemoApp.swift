import SwiftUI

@main
struct MLExportDemoApp: App {
    var body: some Scene {
        WindowGroup { ContentView() }
    }
}
